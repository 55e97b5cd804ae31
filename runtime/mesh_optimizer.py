"""Adam, AdamW and SGD in plain TensorFlow ops, for weights Keras cannot hold: DTensor's DVariables.

Keras 3 optimizers create their slots as Keras variables on the default device, which cannot
sit beside mesh-split weights. This one keeps the math of keras.optimizers.{Adam, AdamW, SGD}
(tests/test_mesh_optimizer.py checks it against them on one device) and their variables, in
their order: iteration, the learning-rate variable (a constant rate only), then each weight's
slots (Adam: momentum, velocity; SGD with momentum: momentum). So `OptimizerState` checkpoints
it under the same `optimizer/state/N` keys as a one-device run, and each slot takes its
weight's layout (slots are split as their weights are).
"""
from __future__ import annotations

import keras
import tensorflow as tf
from tensorflow.experimental import dtensor

from config.params import OptimizerParams
from runtime.optimizer import decay_exempt
from runtime.schedules import learning_rate_schedule


class TensorOpsOptimizer(tf.Module):
    """The `apply_gradients` / `learning_rate` / `iterations` / `variables` surface that
    runtime/steps.InMemoryUpdate and OptimizerState use."""

    def __init__(self, config: OptimizerParams, variables, mesh: dtensor.Mesh | None = None):
        super().__init__(name="tensor_ops_optimizer")
        self.config = config
        self._mesh = mesh
        self._weights = list(variables)
        # Each gradient is laid out as its weight before the update: DTensor's layout propagation
        # may return one otherwise (a replicated LayerNorm's gradient split as the hidden-split
        # embedding's activations), and assigning it to the weight would silently corrupt it.
        self._layouts = [dtensor.fetch_layout(w) for w in self._weights] if mesh is not None else None
        self._schedule = learning_rate_schedule(config)
        self.iterations = self._scalar(tf.constant(0, tf.int64), "iteration")
        state = [self.iterations]
        if not isinstance(self._schedule, keras.optimizers.schedules.LearningRateSchedule):
            self._rate = self._scalar(tf.constant(self._schedule, tf.float32), "learning_rate")
            state.append(self._rate)
        kind = config.optimizer_type
        names = ("momentum", "velocity") if kind in ("adam", "adamw") else \
            ("momentum",) if config.momentum != 0 else ()
        self._slots = []
        for weight in self._weights:
            slots = {name: self._like(weight, name) for name in names}
            self._slots.append(slots)
            state.extend(slots.values())
        self.state = state
        exempt = {id(v) for v in decay_exempt(self._weights)}
        self._decays = [kind == "adamw" and id(v) not in exempt for v in self._weights]

    @property
    def variables(self) -> list[tf.Variable]:
        return list(self.state)

    def _scalar(self, value: tf.Tensor, name: str) -> tf.Variable:
        if self._mesh is None:
            return tf.Variable(value, trainable=False, name=name)
        return dtensor.DVariable(dtensor.copy_to_mesh(value, dtensor.Layout.replicated(self._mesh, 0)),
                                 trainable=False, name=name)

    @staticmethod
    def _like(weight: tf.Variable, name: str) -> tf.Variable:
        zeros = tf.zeros_like(weight.read_value())            # a DTensor keeps the weight's layout
        kind = dtensor.DVariable if dtensor.is_dtensor(zeros) else tf.Variable
        return kind(zeros, trainable=False, name=f"{weight.name.split(':')[0]}_{name}")

    @property
    def learning_rate(self) -> tf.Tensor:
        """The rate of the next update (a schedule is read at the update count, as Keras does)."""
        if hasattr(self, "_rate"):
            return self._rate.read_value()
        return tf.cast(self._schedule(self.iterations), tf.float32)

    def apply_gradients(self, grads_and_vars) -> None:
        pairs = list(grads_and_vars)
        index = {id(v): i for i, v in enumerate(self._weights)}
        rate = self.learning_rate
        c = self.config
        step = tf.cast(self.iterations + 1, tf.float32)
        for grad, weight in pairs:
            i = index[id(weight)]
            slots, grad = self._slots[i], tf.cast(grad, weight.dtype)
            if self._layouts is not None:
                grad = dtensor.relayout(grad, self._layouts[i])
            if self._decays[i]:
                # Decoupled decay before the Adam step, scaled by the rate (Keras AdamW).
                weight.assign(weight - weight * c.weight_decay_rate * rate)
            if c.optimizer_type in ("adam", "adamw"):
                m, v = slots["momentum"], slots["velocity"]
                alpha = rate * tf.sqrt(1 - c.beta2 ** step) / (1 - c.beta1 ** step)
                m.assign_add((grad - m) * (1 - c.beta1))
                v.assign_add((tf.square(grad) - v) * (1 - c.beta2))
                weight.assign_sub(m * alpha / (tf.sqrt(v) + c.epsilon))
            elif slots:
                m = slots["momentum"]
                m.assign(m * c.momentum - grad * rate)
                weight.assign_add(m)
            else:
                weight.assign_sub(grad * rate)
        self.iterations.assign_add(1)
