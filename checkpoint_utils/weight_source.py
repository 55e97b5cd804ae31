"""Where a model's weights come from, read one tensor at a time: a TF checkpoint (a prefix, a
converted model directory or a run's model_dir: its latest checkpoint) or a Hugging Face
directory (config.json + safetensors or PyTorch bins).

Both give (path, array) in our layout (paths and shapes of `weight_specs`, kernels [in, out]) in
the dtype they store (float32, bfloat16 or float16), largest first: a loader that keeps what it
builds meets its largest transient (one tensor and what it makes of it) while it holds the least.
"""
from __future__ import annotations

import math
import os
from collections.abc import Iterator

import numpy as np

from checkpoint_utils.hf_checkpoint import HFCheckpoint
from checkpoint_utils.hf_config import architecture_differences
from checkpoint_utils.tf_checkpoint import checkpoint_key, resolve_checkpoint, variable_shapes
from config.params import ModelParams
from layers.weight_specs import weight_shapes


class CheckpointMismatchError(ValueError):
    """The checkpoint does not hold the model the params describe."""


def is_hf_directory(path: str) -> bool:
    """A Hugging Face checkpoint directory (config.json, no TF `checkpoint` state file)."""
    return (os.path.isdir(path) and os.path.isfile(os.path.join(path, "config.json"))
            and not os.path.isfile(os.path.join(path, "checkpoint")))


def check_checkpoint(prefix: str, model: ModelParams) -> None:
    """Every variable the params imply is in the TF checkpoint with the right shape."""
    found = variable_shapes(prefix)
    expected = weight_shapes(model)
    missing = sorted(set(expected) - set(found))
    if missing:
        raise CheckpointMismatchError(
            f"checkpoint {prefix} lacks {len(missing)} variable(s) the params imply, e.g. "
            f"{', '.join(missing[:3])}; pass the params file the checkpoint was written with")
    for path, shape in expected.items():
        if tuple(found[path]) != tuple(shape):
            raise CheckpointMismatchError(
                f"checkpoint {prefix}: variable {path} has shape {list(found[path])} but the params "
                f"imply {list(shape)}; pass the params file the checkpoint was written with")


class TFCheckpointWeights:
    """The `model/...` variables of a TF checkpoint (any of our writers: convert_hf, a run)."""

    def __init__(self, prefix: str):
        self.prefix = prefix
        self.description = f"checkpoint {prefix}"

    def check(self, model: ModelParams) -> None:
        check_checkpoint(self.prefix, model)

    def arrays(self, model: ModelParams) -> Iterator[tuple[str, np.ndarray]]:
        import tensorflow as tf
        # CheckpointReader.get_tensor reads that one tensor's bytes from the data files.
        reader = tf.train.load_checkpoint(self.prefix)
        shapes = weight_shapes(model)
        for path in sorted(shapes, key=lambda p: (-math.prod(shapes[p]), p)):
            array = reader.get_tensor(checkpoint_key("model", path))
            yield path, array
            del array                 # before the next read: one tensor at a time


class HFDirectoryWeights:
    """The tensors of a Hugging Face directory, mapped to ours (checkpoint_utils.hf_mapping)."""

    def __init__(self, directory: str):
        self.checkpoint = HFCheckpoint(directory)
        self.description = f"Hugging Face checkpoint {directory}"

    def check(self, model: ModelParams) -> None:
        """`model` is the model config.json describes (up to what does not change the weights:
        hf_config.architecture_differences), and every tensor it implies is there with its shape."""
        config_json = os.path.join(self.checkpoint.directory, "config.json")
        differences = architecture_differences(self.checkpoint.params, model)
        if differences:
            raise CheckpointMismatchError(
                f"the model params describe another model than {config_json}: {', '.join(differences)}; "
                "take the model: section from config.json (no --params with --hf-checkpoint)")
        self.checkpoint.check(model, described_by=config_json)

    def arrays(self, model: ModelParams) -> Iterator[tuple[str, np.ndarray]]:
        groups = self.checkpoint.groups(model)
        weights = self.checkpoint.weights
        for group in sorted(groups, key=lambda g: -sum(math.prod(s) for s in g.hf_shapes)):
            arrays = group.to_ours([weights.read(name, keep_dtype=True) for name in group.hf_names])
            for path, array in zip(group.paths, arrays):
                yield path, array
            arrays = array = None     # before the next group: one group at a time


WeightSource = TFCheckpointWeights | HFDirectoryWeights


def open_weights(source: str):
    """The weights at `source`: a Hugging Face directory, else a TF checkpoint prefix or a
    directory with a `checkpoint` state file (its latest checkpoint); a LoRA run's checkpoint
    reads as its base with the adapters merged (checkpoint_utils/lora_checkpoint.py)."""
    if is_hf_directory(source):
        return HFDirectoryWeights(source)
    prefix = resolve_checkpoint(source)
    from checkpoint_utils.lora_checkpoint import MergedLoraWeights, is_lora_checkpoint   # it opens its base here
    if is_lora_checkpoint(prefix):
        return MergedLoraWeights(prefix)
    return TFCheckpointWeights(prefix)
