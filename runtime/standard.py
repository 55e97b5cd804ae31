"""Standard execution: the whole model on the strategy's devices, one compiled step per batch."""
from __future__ import annotations

import tensorflow as tf

from config import modes
from config.params import Params
from runtime.compile_path import CompilePath, choose_compile_path, compile_function, device_type_of
from runtime.distribution import make_strategy
from runtime.execution import CheckpointedExecution
from runtime.logging_utils import log
from runtime.steps import InMemoryUpdate, add_sums, dropout_seed, micro_batches, scaled_loss, zero_sums


class StandardExecution(CheckpointedExecution):
    def __init__(self, params: Params, model_dir: str, training: bool, model_fn, input_fn,
                 strategy: tf.distribute.Strategy | None = None, compile_path: CompilePath | None = None,
                 islands: bool = True):
        """strategy and compile_path: runconfig's by default (the mesh backend passes its own).
        islands: XLA islands in a graph-mode step (runtime/compile_path.py); off over several
        replicas, where one XLA cluster cannot span the devices, and on a DTensor mesh."""
        strategy = strategy or make_strategy(params.runconfig)
        super().__init__(params, model_dir, training, model_fn, input_fn, strategy, strategy.scope())
        self._train_step = None
        self._eval_step = None
        if compile_path is None:
            device_type = device_type_of(strategy.extended.worker_devices[0])
            compile_path = choose_compile_path(params.runconfig.jit_compile, params.model.compute_dtype, device_type,
                                               replicas=strategy.num_replicas_in_sync)
        self.compile_path = compile_path
        self.islands = islands and strategy.num_replicas_in_sync == 1
        self._apply_update = InMemoryUpdate(self.optimizer, self.model.trainable_variables, self.loss_scale,
                                            self.label_positions, params.optimizer.max_gradient_norm,
                                            self.step) if training else None
        log(self.compile_path.describe())

    def _compiled(self, function):
        return compile_function(function, self.compile_path, islands=self.islands)

    def _replica_grads(self, features, labels):
        """Per replica: gradients of the scaled loss summed over grad_accum_steps micro-batches."""
        variables = self.model.trainable_variables
        replica = tf.distribute.get_replica_context().replica_id_in_sync_group
        grads = None
        sums = zero_sums()
        parts = micro_batches(features, labels, self.params.optimizer.grad_accum_steps)
        for micro, (micro_features, micro_labels) in enumerate(parts):
            seed = dropout_seed(self.params.runconfig.seed, self.step, replica, micro, len(parts))
            with tf.GradientTape() as tape:
                spec = self.model_fn(micro_features, micro_labels, modes.TRAIN, self.params, self.model,
                                     dropout_seed=seed)
                loss = scaled_loss(spec.sums, self.loss_scale.scale, self.label_positions)
            # dense (the embedding's gradient is IndexedSlices); the first micro-batch's as they are
            micro_grads = [tf.convert_to_tensor(g) for g in tape.gradient(loss, variables)]
            grads = micro_grads if grads is None else [g + d for g, d in zip(grads, micro_grads)]
            sums = add_sums(sums, spec.sums)
        return grads, sums

    def train_step(self, features, labels) -> dict:
        self.require_training()
        if self._train_step is None:
            strategy = self.strategy

            def step(features, labels):
                grads, sums = strategy.run(self._replica_grads, args=(features, labels))
                grads = [strategy.reduce(tf.distribute.ReduceOp.SUM, g, axis=None) for g in grads]
                sums = {k: strategy.reduce(tf.distribute.ReduceOp.SUM, v, axis=None) for k, v in sums.items()}
                return self._apply_update(grads, sums)

            # Called outside strategy.scope(): in cross-replica context the Keras optimizer applies
            # the already-reduced gradients once (inside the scope it would all-reduce them again).
            self._train_step = self._compiled(step)
        return self._train_step(features, labels)

    def eval_sums(self, features, labels) -> dict:
        if self._eval_step is None:
            strategy = self.strategy

            def replica_eval(features, labels):
                return self.model_fn(features, labels, modes.EVAL, self.params, self.model).sums

            def step(features, labels):
                sums = strategy.run(replica_eval, args=(features, labels))
                return {k: strategy.reduce(tf.distribute.ReduceOp.SUM, v, axis=None) for k, v in sums.items()}

            self._eval_step = self._compiled(step)
        with self.strategy.scope():
            return self._eval_step(features, labels)
