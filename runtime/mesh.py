"""Mesh execution: tensor parallelism (and data parallelism) on a DTensor device mesh.

The standard backend's steps, run on `runconfig.mesh`: the model's variables become DVariables
laid out as runtime/mesh_layouts.py says (Megatron splits over `model`), each batch is split
over `data`, and DTensor's SPMD expansion turns the one-device graph into per-device programs
with the collectives the layouts need. The optimizer is runtime/mesh_optimizer.py's (Keras'
cannot hold DVariables). Checkpoints are written through the same tf.train.Checkpoint: DTensor
saves each variable whole, so the keys and shapes are a one-device run's and either run
resumes the other's checkpoints.
"""
from __future__ import annotations

import tensorflow as tf
from tensorflow.experimental import dtensor

import model as model_module
from config import modes
from config.params import Params, ParamsError
from runtime.compile_path import CompilePath
from runtime.mesh_layouts import (DATA, batch_to_mesh, make_mesh, new_variable, place_model, place_module,
                                  replicated, to_layout)
from runtime.mesh_optimizer import TensorOpsOptimizer
from runtime.standard import StandardExecution

# DTensor expands tf.function graphs into per-device programs; it does not take XLA clusters.
MESH_COMPILE_PATH = CompilePath(False, "runconfig.mesh: DTensor's SPMD expansion runs graph-mode functions")


class MeshExecution(StandardExecution):
    def __init__(self, params: Params, model_dir: str, training: bool, model_fn, input_fn):
        self.mesh = make_mesh(params.runconfig.mesh)
        # The default strategy: one replica whose "device" is the whole mesh.
        super().__init__(params, model_dir, training, model_fn, input_fn,
                         strategy=tf.distribute.get_strategy(), compile_path=MESH_COMPILE_PATH,
                         islands=False)

    def build_state(self) -> tuple:
        model = model_module.build_model(self.params)              # drawn on the host: the same initial values
        place_model(self.mesh, model)
        optimizer = (TensorOpsOptimizer(self.params.optimizer, model.trainable_variables, self.mesh)
                     if self.training else None)
        loss_scale = self.new_loss_scale()
        place_module(self.mesh, loss_scale)
        step = new_variable(self.mesh, tf.constant(0, tf.int64), trainable=False, name="global_step")
        return model, optimizer, loss_scale, step

    def assign_weight(self, variable: tf.Variable, value) -> None:
        variable.assign(to_layout(self.mesh, value, dtensor.fetch_layout(variable).sharding_specs))

    def check_batch(self, mode: str) -> None:
        super().check_batch(mode)
        data, batch = self.params.runconfig.mesh.data, self.params.train_input.batch_size
        if mode == modes.TRAIN and batch % data:
            raise ParamsError(f"train_input.batch_size={batch} must be divisible by runconfig.mesh.data={data}")

    def dataset(self, mode: str, position: int):
        """Global batches from one input pipeline; each step splits its batch over the mesh."""
        return self.input_fn(self.params, mode, None, data_position=position)

    def to_mesh(self, features: dict, labels) -> tuple[dict, tf.Tensor]:
        """A host batch split over `data`; a final eval batch that does not divide is replicated."""
        rows = int(labels.shape[0])
        place = (lambda t: batch_to_mesh(self.mesh, t)) if rows % self.mesh.dim_size(DATA) == 0 else \
            (lambda t: replicated(self.mesh, t))
        return {name: place(value) for name, value in features.items()}, place(labels)

    def train_step(self, features, labels) -> dict:
        with dtensor.default_mesh(self.mesh):
            return super().train_step(*self.to_mesh(features, labels))

    def eval_sums(self, features, labels) -> dict:
        with dtensor.default_mesh(self.mesh):
            return super().eval_sums(*self.to_mesh(features, labels))

