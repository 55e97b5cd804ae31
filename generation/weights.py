"""Weight formats for generation: float32 as trained, bfloat16, or weight-only int8.

Decoding one token reads every weight of the blocks and the LM head once per step, so at
small batches its speed is the weights' bytes over memory bandwidth. The 16- and 8-bit
formats store each dense kernel as rows [out, in] in that format, which XLA reads directly
in its matrix-vector products (layers/dense.py):

    float32   the model's own variables (4 bytes per weight)
    bfloat16  kernels in bfloat16 (held as their int16 bits: layers.dense.read_after), math in
              bfloat16 with float32 LayerNorm, softmax and logits (model.mixed_precision's
              numerics; 2 bytes per weight)
    int8      kernels as int8 with one float32 scale per output channel, symmetric:
              scale = max |w[:, o]| / 127, q = round(w / scale), so |w - q * scale| <= scale / 2;
              math in float32 on the dequantized weights (1 byte per weight)

LayerNorms and biases stay float32 (a step reads a few vectors), and so does the embedding
table (a step reads one row), except in the bfloat16 format: its math gathers rows and casts
them to bfloat16, so a bfloat16 table gives the same values in half the bytes (413 MB less
for GPT-J 6B; `bfloat16_table`). `GenerationModel` is what the decoders call in place of a
GPTJModel.
"""
from __future__ import annotations

import tensorflow as tf

from generation.config import WEIGHT_FORMATS
from layers.packed import (PACK_BLOCK_BYTES, bfloat16_bits_host, bfloat16_table, dequantize_int8,  # noqa: F401
                           is_embedding_table, is_packed, pack_kernel, quantize_int8, quantize_int8_host,
                           transpose_host)  # (re-exported: generation.weights.pack_kernel etc.)
from layers.tree import flatten_weights
from model import GPTJModel


def pack_weights(tree, weight_format: str):
    """The model's weight tree with every dense kernel (a rank-2 "kernel") packed."""
    if isinstance(tree, list):
        return [pack_weights(t, weight_format) for t in tree]
    if not isinstance(tree, dict):
        return tree
    out = {}
    for name, value in tree.items():
        if isinstance(value, tf.Variable) and is_packed(name, value.shape.rank):
            out.update(pack_kernel(value, weight_format))
        elif isinstance(value, tf.Variable) and is_embedding_table(name, value.shape.rank) and weight_format == "bfloat16":
            out[name] = bfloat16_table(value)
        else:
            out[name] = pack_weights(value, weight_format)
    return out


def tree_bytes(tree: dict) -> int:
    """Bytes of every tensor in a weight tree."""
    return sum(t.shape.num_elements() * t.dtype.size for t in flatten_weights(tree).values())


class GenerationModel:
    """A GPTJModel's code over weights in one format: `.config`, `.empty_cache` and calls like
    the model's own, which is all the decoders use."""

    def __init__(self, model: GPTJModel, weight_format: str = "float32", weights: dict | None = None):
        """weights: the tree already in `weight_format` (generation/loading.py builds it from a
        checkpoint, over a model without variables); default: the model's own, packed here."""
        if weight_format not in WEIGHT_FORMATS:
            raise ValueError(f"weight format {weight_format!r} is not one of {', '.join(WEIGHT_FORMATS)}")
        self.weight_format = weight_format
        self.model = model.with_compute_dtype("bfloat16") if weight_format == "bfloat16" else model
        if weights is None:
            tree = model.weights_tree()
            weights = tree if weight_format == "float32" else pack_weights(tree, weight_format)
        self.weights = weights

    @property
    def config(self):
        return self.model.config

    @property
    def weight_bytes(self) -> int:
        return tree_bytes(self.weights)

    def empty_cache(self, batch_size: int, cache_length: int):
        return self.model.empty_cache(batch_size, cache_length)

    def __call__(self, *args, **kwargs):
        # layers/dense.py reads each packed kernel after its input (read_after), a block at a time:
        # converted in the step that uses it, never the whole model at once.
        return self.model.forward(self.weights, *args, **kwargs)


def generation_model(model: GPTJModel, weight_format: str = "float32") -> GPTJModel | GenerationModel:
    """`model` itself for float32, else a GenerationModel in `weight_format`."""
    return model if weight_format == "float32" else GenerationModel(model, weight_format)
