"""Loss scaling for float16 training: fixed, or dynamic (halve on overflow, grow after a run
of good steps, capped at `max_loss_scale`).

Ours rather than keras.optimizers.LossScaleOptimizer: that one has no cap, and weight
streaming applies updates block by block on the host, which needs the finite check and the
scale update as separate steps around the optimizer, not inside it.
"""
from __future__ import annotations

import tensorflow as tf

from config.params import OptimizerParams


class LossScale(tf.Module):
    def __init__(self, config: OptimizerParams, enabled: bool):
        super().__init__(name="loss_scale")
        self.dynamic = enabled and config.loss_scaling_factor == "dynamic"
        if not enabled:
            initial = 1.0
        elif self.dynamic:
            initial = config.initial_loss_scale
        else:
            initial = float(config.loss_scaling_factor)
        self.scale = tf.Variable(initial, dtype=tf.float32, trainable=False, name="scale")
        self.good_steps = tf.Variable(0, dtype=tf.int64, trainable=False, name="good_steps")
        self.max_scale = float(config.max_loss_scale)
        self.growth_interval = int(config.steps_per_loss_scale_increase)

    def unscale(self, grads: list[tf.Tensor]) -> list[tf.Tensor]:
        inverse = 1.0 / self.scale
        return [g * inverse for g in grads]

    def update(self, grads_finite: tf.Tensor) -> None:
        """After a step: on overflow halve the scale; after growth_interval good steps double it."""
        if not self.dynamic:
            return
        grow = tf.logical_and(grads_finite, self.good_steps + 1 >= self.growth_interval)
        new_scale = tf.where(grads_finite,
                             tf.where(grow, tf.minimum(self.scale * 2.0, self.max_scale), self.scale),
                             tf.maximum(self.scale * 0.5, 1.0))
        self.scale.assign(new_scale)
        self.good_steps.assign(tf.where(tf.logical_and(grads_finite, tf.logical_not(grow)),
                                        self.good_steps + 1, tf.zeros_like(self.good_steps)))


def all_finite(tensors: list[tf.Tensor]) -> tf.Tensor:
    return tf.reduce_all([tf.reduce_all(tf.math.is_finite(t)) for t in tensors])
