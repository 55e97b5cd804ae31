"""The device mesh of `runconfig.mesh` and where each weight lives on it (DTensor layouts).

Megatron's split of a decoder block, over the mesh's `model` axis:

    q/k/v, fc_in kernels [D, out]   by output columns   [-, model]   (their biases [model])
    out_proj, fc_out kernels [in, D] by input rows       [model, -]   (their biases replicated)
    embedding [V, D]                 by vocabulary rows  [model, -]
    lm_head kernel [D, V]            by vocabulary cols  [-, model]   (its bias [model])
    LayerNorms                       replicated

and, when `model` does not divide V, over the hidden axis instead (HIDDEN_SPLIT_VOCABULARY):
embedding [-, model], lm_head kernel [model, -] (its bias replicated).

Column blocks of q/k/v are D/M = (heads/M) x head_dim wide, so each device holds whole heads
(params require num_heads % M == 0) and rotary, which mixes dims inside a head only, runs per
device unchanged. The batch is split over the `data` axis. DTensor's SPMD expansion inserts
the collectives the layouts imply (the all-reduce after a row split, the gradient all-reduce
over `data`); the layer code is the one every backend runs.
"""
from __future__ import annotations

from collections.abc import Sequence

import tensorflow as tf
from tensorflow.experimental import dtensor

from config.params import MeshParams, ParamsError
from layers.attention import blend_cache
from model import GPTJModel

DATA, MODEL = "data", "model"
_ = dtensor.UNSHARDED

# (path suffix, sharding of each axis); the first match wins, anything else is replicated.
WEIGHT_LAYOUTS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("attn/q_proj/kernel", (_, MODEL)), ("attn/k_proj/kernel", (_, MODEL)), ("attn/v_proj/kernel", (_, MODEL)),
    ("attn/q_proj/bias", (MODEL,)), ("attn/k_proj/bias", (MODEL,)), ("attn/v_proj/bias", (MODEL,)),
    ("mlp/fc_in/kernel", (_, MODEL)), ("mlp/fc_in/bias", (MODEL,)),
    ("attn/out_proj/kernel", (MODEL, _)), ("mlp/fc_out/kernel", (MODEL, _)),
    ("embedding/embeddings", (MODEL, _)),
    ("lm_head/kernel", (_, MODEL)), ("lm_head/bias", (MODEL,)), ("lm_head_bias", (MODEL,)),
)

# A vocabulary that `model` does not divide (DTensor splits evenly) splits the embedding and the
# head over the hidden axis instead: the same 1/M of their bytes per device, no padded rows, and
# checkpoints unchanged; the head's logits come out of a row split, whole after an all-reduce.
HIDDEN_SPLIT_VOCABULARY: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("embedding/embeddings", (_, MODEL)),
    ("lm_head/kernel", (MODEL, _)), ("lm_head/bias", (_,)), ("lm_head_bias", (_,)),
)


def mesh_device_type() -> str:
    """The mesh's devices: GPUs when there are any, else the (logical) CPUs."""
    return "GPU" if tf.config.list_logical_devices("GPU") else "CPU"


def make_mesh(config: MeshParams) -> dtensor.Mesh:
    """The (data, model) mesh over every local device of one type; ParamsError when the sizes
    do not multiply to the device count."""
    device_type = mesh_device_type()
    count = len(tf.config.list_logical_devices(device_type))
    if config.devices != count:
        fix = f"set runconfig.cpu_devices={config.devices} (logical CPU devices) or choose data x model = {count}" \
            if device_type == "CPU" else f"choose data x model = {count}"
        raise ParamsError(f"runconfig.mesh data={config.data} x model={config.model} = {config.devices} devices, "
                          f"but this process has {count} {device_type} device(s); {fix}")
    return dtensor.create_mesh([(DATA, config.data), (MODEL, config.model)], device_type=device_type)


def weight_sharding(path: str, shape: Sequence[int], model_size: int) -> tuple[str, ...]:
    """The sharding spec (one mesh axis or UNSHARDED per tensor axis) of weight `path` of `shape`
    on a mesh whose `model` axis has `model_size` devices."""
    def layout(table):
        return next((spec for suffix, spec in table if path.endswith(suffix) and len(spec) == len(shape)), None)

    def divides(spec):
        return all(n % model_size == 0 for n, axis in zip(shape, spec) if axis == MODEL)

    spec = layout(WEIGHT_LAYOUTS)
    if spec is None:
        return (_,) * len(shape)
    if not divides(spec):
        spec = layout(HIDDEN_SPLIT_VOCABULARY)     # heads and filter columns divide (params check them)
    return spec


def replicated(mesh: dtensor.Mesh, value) -> tf.Tensor:
    """A host value as a DTensor held whole by every device."""
    value = tf.convert_to_tensor(value)
    return dtensor.copy_to_mesh(value, dtensor.Layout.replicated(mesh, value.shape.rank))


def to_layout(mesh: dtensor.Mesh, value, sharding: Sequence[str]) -> tf.Tensor:
    """A host value (or a DTensor) laid out as `sharding` on `mesh`."""
    if not dtensor.is_dtensor(value):
        value = replicated(mesh, value)
    return dtensor.relayout(value, dtensor.Layout(list(sharding), mesh))


def batch_to_mesh(mesh: dtensor.Mesh, tensor) -> tf.Tensor:
    """A host batch [b, ...] split over the data axis (b must be a multiple of mesh `data`)."""
    rank = tf.convert_to_tensor(tensor).shape.rank
    return to_layout(mesh, tensor, (DATA,) + (_,) * (rank - 1))


def new_variable(mesh: dtensor.Mesh, value, sharding: Sequence[str] | None = None, **kwargs) -> tf.Variable:
    """A DVariable of `value` (host or DTensor), replicated unless a sharding is given."""
    value = value if dtensor.is_dtensor(value) else tf.convert_to_tensor(value)
    return dtensor.DVariable(to_layout(mesh, value, sharding or (_,) * value.shape.rank), **kwargs)


def place_module(mesh: dtensor.Mesh, module: tf.Module, prefix: str = "") -> None:
    """Replace every tf.Variable attribute of `module` and its sub-modules (lists included) by a
    DVariable of the same value, laid out by `weight_sharding` of its path ("blocks/0/attn/...",
    the weights_tree path). The attribute names, hence the checkpoint keys, stay the same."""
    for name, value in list(vars(module).items()):
        if name.startswith("_"):
            continue
        path = f"{prefix}{name}"
        if isinstance(value, tf.Variable) and not isinstance(value, dtensor.DVariable):
            sharding = weight_sharding(path, value.shape, mesh.dim_size(MODEL))
            setattr(module, name, new_variable(mesh, value.read_value(), sharding,
                                               trainable=value.trainable, name=value.name.split(":")[0]))
        elif isinstance(value, tf.Module):
            place_module(mesh, value, f"{path}/")
        elif isinstance(value, Sequence) and value and all(isinstance(v, tf.Module) for v in value):
            for i, child in enumerate(value):
                place_module(mesh, child, f"{path}/{i}/")


def place_model(mesh: dtensor.Mesh, model: GPTJModel) -> None:
    """Lay `model`'s weights out on `mesh` (place_module), and have its attention layers write
    their key/value caches with blend_cache, whose ops DTensor can expand on head-split caches."""
    place_module(mesh, model)
    for block in model.blocks:
        block.attn.cache_writer = blend_cache


def local_shapes(variable: tf.Variable) -> list[tuple[int, ...]]:
    """The shape of `variable`'s piece on each mesh device."""
    return [tuple(piece.shape) for piece in dtensor.unpack(variable.read_value())]
