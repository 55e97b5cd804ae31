"""Load our model's weights from a TF checkpoint, after checking it holds that model."""
from __future__ import annotations

import tensorflow as tf

from checkpoint_utils.tf_checkpoint import resolve_checkpoint, variable_shapes
from model import GPTJModel, weight_shapes
from config.params import ModelParams


class CheckpointMismatchError(ValueError):
    """The checkpoint does not hold the model the params describe."""


def check_checkpoint(prefix: str, model: ModelParams) -> None:
    """Every variable the params imply is in the checkpoint with the right shape."""
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


def load_model(config: ModelParams, checkpoint: str) -> GPTJModel:
    """A GPTJModel with every weight restored from `checkpoint` (prefix or directory)."""
    prefix = resolve_checkpoint(checkpoint)
    check_checkpoint(prefix, config)
    model = GPTJModel(config)
    tf.train.Checkpoint(model=model).restore(prefix).expect_partial().assert_existing_objects_matched()
    return model
