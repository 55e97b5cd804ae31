"""How far two float32 evaluations of the same model may differ by rounding alone.

Two computations of the same math that differ in summation order (another framework, another
oneDNN or XLA kernel, another CPU) differ by rounding only. This turns "how much rounding can
this computation make" into a bound, so a tolerance follows from the model's size instead of
being a number read off one machine's run. `checkpoint_utils.verify` takes its default
tolerance from here; the test suite's bounds (tests/numerics.py) build on it.
"""
from __future__ import annotations

import math

from config.params import ModelParams

U32 = 2.0 ** -24        # float32 unit roundoff: 24 significand bits

# A float32 forward pass: along the path to a logit, each block chains ~9 reductions (layer-norm
# mean and variance, q/k/v, scores, softmax sum, attention x values, output projection, fc_in,
# fc_out); the head adds final layer norm (2) and the logits (1).
REDUCTIONS_PER_BLOCK = 9
HEAD_REDUCTIONS = 3

# Rounding errors of independent signs add like a random walk: a chain of R sums of K terms each
# rounds by ~sqrt(R * K) * u relative to the values' size (the deterministic worst case, R * K * u,
# is reached only if every rounding goes the same way). Tolerances take 10x that estimate.
ROUNDING_MARGIN = 10.0


def forward_reductions(num_blocks: int) -> int:
    return num_blocks * REDUCTIONS_PER_BLOCK + HEAD_REDUCTIONS


def float32_atol(reductions: int, terms: int, scale: float) -> float:
    """Bound on |a - b| for two float32 evaluations, in different summation orders, of a chain of
    `reductions` sums of at most `terms` terms on values of size <= `scale`."""
    return ROUNDING_MARGIN * math.sqrt(reductions * terms) * U32 * scale


def longest_sum(model: ModelParams, sequence_length: int) -> int:
    """Terms of the longest sum of a forward pass: over the hidden size (projections, head), the
    filter size (fc_out) or the positions (attention x values)."""
    return max(model.hidden_size, model.filter_size, sequence_length)


def logits_atol(model: ModelParams, sequence_length: int, scale: float) -> float:
    """Bound on max |logits difference| of two float32 forward passes of `model` over
    `sequence_length` tokens, for logits of size <= `scale` (layer norms keep the values along
    the way at the logits' scale)."""
    return float32_atol(forward_reductions(model.num_hidden_layers), longest_sum(model, sequence_length), scale)


def int8_error(fan_in: int) -> float:
    """RMS of a kernel's int8 error (generation's per-channel format) relative to its weights' RMS,
    for Gaussian weights: the scale is max|w| / 127 over a column of fan_in weights (max ~
    sqrt(2 ln 2n) std), and the error, within scale / 2, is uniform: RMS scale / sqrt(12)."""
    return math.sqrt(2 * math.log(2 * fan_in)) / (127 * math.sqrt(12))


def int8_logits_error(layers: int, hidden: int, inner: int) -> float:
    """RMS change of the logits, relative to their std, when every kernel is held in int8: the
    error of each kernel on the path (q, k, v, out, fc_in with fan-in hidden, fc_out with fan-in
    inner, per block, and the head) reaches a logit as an independent relative perturbation of its
    output (LayerNorm keeps each value at its scale; a random kernel maps a relative input error
    to the same relative output error), so they add as a random walk."""
    return math.sqrt(layers * (5 * int8_error(hidden) ** 2 + int8_error(inner) ** 2) + int8_error(hidden) ** 2)
