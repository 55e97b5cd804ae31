"""Load our model's float32 weights from a TF checkpoint or a Hugging Face directory, tensor by
tensor, after checking the source holds that model.

Each variable is made from its checkpoint tensor (widened to float32 when stored in 16 bits):
no initial values are drawn and no second model is built, so memory is the model plus one
tensor in flight.
"""
from __future__ import annotations

import ml_dtypes
import numpy as np
import tensorflow as tf

from checkpoint_utils.host_arrays import aligned_copy, as_tensor
from checkpoint_utils.weight_source import (CheckpointMismatchError, WeightSource, check_checkpoint,  # noqa: F401
                                            open_weights)
from config.params import ModelParams
from layers.packed import bfloat16_table, is_embedding_table, is_packed, pack_kernel
from layers.tree import unflatten_weights
from model import GPTJModel, build_model_with


def float32_variable(array: np.ndarray, name: str, trainable: bool = True) -> tf.Variable:
    """A float32 variable holding `array` (float32, or bfloat16/float16 widened exactly)."""
    if array.dtype != np.float32:
        array = aligned_copy(array, np.float32)
    return tf.Variable(as_tensor(array), trainable=trainable, name=name)


def build_float32_model(config: ModelParams, weights: WeightSource) -> GPTJModel:
    """A GPTJModel whose variables are made from `weights`' tensors, one at a time (checked first)."""
    weights.check(config)
    variables = {}
    for path, array in weights.arrays(config):
        variables[path] = float32_variable(array, path.rsplit("/", 1)[-1])
        array = None                  # before the next read: one tensor at a time
    return build_model_with(config, lambda spec: variables.pop(spec.path))


def load_model(config: ModelParams, checkpoint: str) -> GPTJModel:
    """A GPTJModel with every weight read from `checkpoint`: a TF checkpoint prefix, a directory
    with a `checkpoint` file (its latest), or a Hugging Face directory."""
    return build_float32_model(config, open_weights(checkpoint))


def load_weight_tree(config: ModelParams, weights: WeightSource, weight_format: str) -> dict:
    """A weights tree of GPTJModel(config) in `weight_format`, frozen (no variable trainable), made
    from `weights`' tensors one at a time (checked first): dense kernels packed in the bfloat16
    and int8 formats (layers/packed.py), a block of output channels at a time; the token table
    in bfloat16 in the bfloat16 format, and in int8 when the source stores it in bfloat16 (exact;
    not for a table tied to the head, which a step would widen whole); the rest float32
    variables (LayerNorms, biases). The largest transient is one source tensor and its packed copy.
    Generation's formats (generation/loading.py) and LoRA's frozen base (model.LoraModel) load so."""
    weights.check(config)
    flat = {}
    for path, array in weights.arrays(config):
        if weight_format != "float32" and is_packed(path, array.ndim):
            layer = path.rsplit("/", 1)[0]
            flat.update({f"{layer}/{name}": variable for name, variable in pack_kernel(array, weight_format).items()})
        elif is_embedding_table(path, array.ndim) and (weight_format == "bfloat16" or (
                weight_format == "int8" and array.dtype == ml_dtypes.bfloat16 and not config.share_embedding_weights)):
            flat[path] = bfloat16_table(array)
        else:
            flat[path] = float32_variable(array, path.rsplit("/", 1)[-1], trainable=False)
        array = None                  # before the next read: one tensor at a time
    return unflatten_weights(flat)
