"""The pieces of a training step that every execution backend shares: micro-batches, dropout
seeds, the loss scaling of gradients, and the end of an in-memory update.

Gradient convention: each micro-batch differentiates `scaled_loss(sums)`, the loss summed over
its counted tokens times loss_scale / label_positions (a constant, the global batch's label
positions), so gradients keep the size of a mean loss's, as float16 loss scaling expects.
Once every micro-batch and replica is summed, `InMemoryUpdate` turns them into gradients of
the mean loss over counted tokens: times label_positions / tokens / loss_scale.
"""
from __future__ import annotations

import tensorflow as tf

from layers.dropout import fold_seed
from layers.fusion import island

from runtime.loss_scale import LossScale, all_finite
from runtime.optimizer import current_learning_rate

SUM_KEYS = ("loss", "correct", "tokens")


def zero_sums() -> dict:
    return {key: 0.0 for key in SUM_KEYS}


def add_sums(total: dict, more: dict) -> dict:
    return {key: total[key] + more[key] for key in SUM_KEYS}


def micro_batches(features: dict, labels: tf.Tensor, count: int) -> list[tuple[dict, tf.Tensor]]:
    """The batch [b, ...] as `count` consecutive micro-batches [b / count, ...] (grad_accum_steps).
    One micro-batch is the batch itself (no split op: DTensor cannot split a mesh-split axis)."""
    if count == 1:
        return [(features, labels)]
    split_features = {name: tf.split(value, count, axis=0) for name, value in features.items()}
    split_labels = tf.split(labels, count, axis=0)
    return [({name: parts[i] for name, parts in split_features.items()}, split_labels[i]) for i in range(count)]


def dropout_seed(run_seed: int, step: tf.Tensor, replica: tf.Tensor | int, micro: int, micro_count: int) -> tf.Tensor:
    """[2] int64 dropout seed of one micro-batch (layers/dropout.py folds in the layer and site).

    A function of (runconfig.seed, global step, slice of the global batch) only, so a resumed run
    draws the masks an uninterrupted one would, on any backend. The slice is replica *
    micro_count + micro: replica r holds rows r of R equal parts of the global batch and splits
    them into micro_count micro-batches, so R replicas accumulating A micro-batches draw the
    masks one device accumulating R * A draws for the same rows."""
    batch_slice = tf.cast(replica, tf.int64) * micro_count + micro
    return fold_seed(tf.stack([tf.constant(run_seed, tf.int64), tf.cast(step, tf.int64)]), batch_slice)


def scaled_loss(sums: dict, scale: tf.Tensor, label_positions: float) -> tf.Tensor:
    """What each micro-batch differentiates (see the module docstring); scale: the loss scale's value."""
    return sums["loss"] * (scale / label_positions)


def gradient_factor(sums: dict, loss_scale: LossScale, label_positions: float) -> tf.Tensor:
    """Summed gradients of `scaled_loss` times this are gradients of the mean loss over counted tokens."""
    return label_positions / tf.maximum(sums["tokens"], 1.0) / loss_scale.scale


def step_logs(sums: dict, grad_norm, learning_rate, loss_scale_value, finite) -> dict:
    """The logs every train step returns (as tensors)."""
    tokens = tf.maximum(sums["tokens"], 1.0)
    return {"loss": sums["loss"] / tokens, "accuracy": sums["correct"] / tokens, "tokens": sums["tokens"],
            "grad_norm": grad_norm, "learning_rate": learning_rate, "loss_scale": loss_scale_value,
            "finite": finite}


class InMemoryUpdate:
    """The end of an in-memory train step (standard and memory weight streaming): scale the summed
    gradients to the mean loss's, check them, clip by global norm, apply them when finite, update
    the loss scale and the step counter; a call returns `step_logs`. Works in a tf.function and eagerly.

    A backend builds one for its optimizer and calls it from its step: the XLA island of the update
    (layers/fusion.py) is then one tf.function for the backend's life, traced once per input
    signature, where an island built inside the step would be traced and compiled again at every
    trace of the step."""

    def __init__(self, optimizer, variables: list, loss_scale: LossScale, label_positions: float,
                 max_gradient_norm: float | None, step: tf.Variable):
        self.optimizer, self.variables, self.loss_scale = optimizer, variables, loss_scale
        self.label_positions, self.max_gradient_norm, self.step = label_positions, max_gradient_norm, step
        self._scaled_checked_applied = island(self._scale_check_apply)

    def _scale_check_apply(self, grads: list, sums: dict):
        factor = gradient_factor(sums, self.loss_scale, self.label_positions)
        grads = [g * factor for g in grads]
        finite = all_finite(grads + [sums["loss"]])
        grad_norm = tf.linalg.global_norm(grads)
        if self.max_gradient_norm is not None:
            grads, _ = tf.clip_by_global_norm(grads, self.max_gradient_norm, use_norm=grad_norm)

        def apply():
            self.optimizer.apply_gradients(zip(grads, self.variables))
            return tf.constant(True)

        return tf.cond(finite, apply, lambda: tf.constant(False)), grad_norm

    def __call__(self, grads: list, sums: dict) -> dict:
        learning_rate = current_learning_rate(self.optimizer)
        finite, grad_norm = self._scaled_checked_applied(grads, sums)
        loss_scale_value = tf.identity(self.loss_scale.scale)
        self.loss_scale.update(finite)
        self.step.assign_add(1)
        return step_logs(sums, grad_norm, learning_rate, loss_scale_value, finite)
