"""Warm start: load model weights (only) from a converted HF checkpoint or another run's checkpoint."""
from __future__ import annotations

from dataclasses import dataclass, field

from layers.tree import flatten_weights
from checkpoint_utils.host_arrays import aligned_copy
from checkpoint_utils.load import CheckpointMismatchError
from checkpoint_utils.tf_checkpoint import checkpoint_key, resolve_checkpoint, variable_shapes
from model import GPTJModel


@dataclass
class WarmStartReport:
    checkpoint: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)     # in the model, not in the checkpoint: kept at init
    skipped: list[str] = field(default_factory=list)     # in the checkpoint, not in the model

    def summary(self) -> str:
        lines = [f"warm start from {self.checkpoint}: {len(self.loaded)} variables loaded, "
                 f"{len(self.missing)} missing (kept at initialisation), {len(self.skipped)} skipped"]
        if self.missing:
            lines.append("  missing: " + ", ".join(self.missing[:10]) + (" ..." if len(self.missing) > 10 else ""))
        if self.skipped:
            lines.append("  skipped: " + ", ".join(self.skipped[:10]) + (" ..." if len(self.skipped) > 10 else ""))
        return "\n".join(lines)


def warm_start(model: GPTJModel, checkpoint: str, assign=None) -> WarmStartReport:
    """Assign every model variable found in `checkpoint` (one tensor at a time, widened to the
    variable's float32 when the checkpoint stores bfloat16); a variable
    present with another shape is an error, since the params do not describe that checkpoint.
    assign(variable, host array): how a value enters a variable (the mesh backend lays it out)."""
    import tensorflow as tf
    prefix = resolve_checkpoint(checkpoint)
    found = variable_shapes(prefix)
    reader = tf.train.load_checkpoint(prefix)
    report = WarmStartReport(prefix)
    variables = flatten_weights(model.weights_tree())
    for path, variable in sorted(variables.items()):
        if path not in found:
            report.missing.append(path)
            continue
        if tuple(found[path]) != tuple(variable.shape):
            raise CheckpointMismatchError(
                f"--checkpoint-path {prefix}: {path} has shape {list(found[path])} but model params imply "
                f"{list(variable.shape)}; use the model: section the checkpoint was converted with "
                "(its params.yaml)")
        value = reader.get_tensor(checkpoint_key("model", path))
        if value.dtype != variable.dtype.as_numpy_dtype:     # a bfloat16 checkpoint (convert_hf --dtype): widen exactly
            value = aligned_copy(value, variable.dtype.as_numpy_dtype)
        variable.assign(value) if assign is None else assign(variable, value)
        report.loaded.append(path)
    report.skipped = sorted(p for p in found if p not in variables)
    if not report.loaded:
        raise CheckpointMismatchError(f"--checkpoint-path {prefix} holds no variable of this model "
                                      "(keys model/...); pass a converted model directory or a run's model_dir")
    return report
