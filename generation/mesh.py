"""Generation with a model whose weights are split over a device mesh (runtime/mesh_layouts.py).

The decoders run unchanged. The model must be placed with runtime.mesh_layouts.place_model
(its caches are then written with blend_cache, whose ops DTensor can expand), every state the
host builds is copied onto the mesh (DTensor functions take DTensors), and the steps compile
in graph mode (DTensor expands graph-mode functions). The batch is replicated over the mesh's
`data` axis; weights and caches are split over `model`. Greedy decoding and sampling; beam
search is not wired.
"""
from __future__ import annotations

import tensorflow as tf
from tensorflow.experimental import dtensor

from generation.config import GenerationConfig, GenerationConfigError
from generation.generator import Generator
from model import GPTJModel
from runtime.mesh_layouts import replicated


def replicate_state(mesh: dtensor.Mesh):
    """place_state for Generator: every host-built tensor of a decoder state, replicated on `mesh`."""
    def place(state):
        return tf.nest.map_structure(lambda t: t if dtensor.is_dtensor(t) else replicated(mesh, t), state)
    return place


class MeshGenerator(Generator):
    """A Generator for a model placed on `mesh`; call it inside `dtensor.default_mesh(mesh)`."""

    def __init__(self, model: GPTJModel, mesh: dtensor.Mesh, length_multiple: int = 32):
        super().__init__(model, "graph", length_multiple, place_state=replicate_state(mesh))

    def decoder(self, config: GenerationConfig, batch_size: int, prompt_slots: int, cache_length: int):
        if config.num_beams > 1:
            raise GenerationConfigError("beam search is not wired on a device mesh; use greedy decoding or sampling")
        return super().decoder(config, batch_size, prompt_slots, cache_length)
