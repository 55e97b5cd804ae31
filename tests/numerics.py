"""The numbers the numerics tests derive their tolerances from (STYLE.md practice 15).

Two computations of the same math that differ in summation order (another oneDNN or XLA
kernel on another CPU, a cache, recomputation, accumulation, another framework) differ by
rounding only. These helpers turn "how much rounding can this computation make" into a bound,
so no tolerance is a number read off one machine's run.
"""
from __future__ import annotations

import math

import numpy as np

# float32 unit roundoff, the forward pass's chain of reductions and the rounding bound of such a
# chain live where checkpoint_utils.verify's default tolerance reads them; re-exported for the tests.
from checkpoint_utils.rounding import U32, float32_atol, forward_reductions  # noqa: F401

U_BF16 = 2.0 ** -8      # bfloat16: 8 significand bits
U_FP16 = 2.0 ** -11     # float16: 11 significand bits


# On the way to a logit a block rounds ~10 values to the compute dtype (normed input, q, k, v,
# scores, probabilities, attention output, projection, fc_in, fc_out) and the embedding, final norm
# and head 3 more: each rounding is <= u relative to its value and layer norms keep values at the
# logits' scale, so |dz| <= 23 u max|z| in the worst case (every rounding the same way).
LOW_PRECISION_ROUNDINGS = 2 * 10 + 3

# Logits of the tiny transformers models (tests/hf_models.py: at most 3 blocks, sums of at most
# 4d = 128 terms, |logits| <= 2.5) from our float32 TF model and from torch:
# float32_atol(forward_reductions(3), 128, 2.5) = 9.3e-5. A conversion bug (a transposed or
# misplaced weight, the other rotary layout) moves logits by 1e-2 or more.
LOGITS_VS_TRANSFORMERS = 1e-4

# Adam/AdamW move a weight by lr * m_hat / (sqrt(v_hat) + eps) per step. For beta1 = 0.9,
# beta2 = 0.999 and the first ~10 steps, Cauchy-Schwarz on the bias-corrected averages gives
# |m_hat| / sqrt(v_hat) <= 1.04: a step is at most ~lr. Two runs whose gradients differ by
# summation order (|dg| ~ 1e-6 of the largest gradient at step 1, growing as the weights drift
# apart by rounding) take steps whose direction m_hat / sqrt(v_hat) differs by |dg| / sqrt(v_hat):
# below 1e-6 for a weight with a typical gradient, up to ~1e-4 for the rare weight whose gradient
# nearly cancels (its sqrt(v_hat) is ~100x below the tensor's RMS). ADAM_DIRECTION_ERROR bounds it
# with a 10x margin. At step 1 the step is lr * g / (|g| + eps_hat), eps_hat = eps / sqrt(1 - beta2)
# = 3.2e-7 for eps = 1e-8, whose sensitivity to dg peaks at |dg| / (4 eps_hat) when |g| = eps_hat;
# gradients that small occur in the q/k kernels (RMS 3e-5), whose rounding is |dg| <= 2e-9, so
# <= 2e-3: inside the budget of a run of >= 3 steps.
ADAM_DIRECTION_ERROR = 1e-3

# |dg|: element-wise difference of a gradient of the tiny runtime models (2 blocks, batches of
# 8 x 16 = 128 tokens) computed in two summation orders. The backward pass doubles the forward's
# chain of reductions; entries are <= 1 because the global norm is clipped to 1:
# sqrt(2 * 21 * 128) * u = 4.4e-6 (measured: <= 5e-8 at step 1).
GRADIENT_ROUNDING = math.sqrt(2 * forward_reductions(2) * 128) * U32


def adam_weight_atol(steps: int, lr: float) -> float:
    """Bound on a weight's difference after `steps` Adam(W) steps of rate `lr` taken on gradients
    that differ by rounding only."""
    return steps * lr * ADAM_DIRECTION_ERROR


def sgd_weight_atol(steps: int, lr: float, momentum: float) -> float:
    """SGD: step t applies lr * sum_{k<=t} momentum^(t-k) * g_k, so each gradient's rounding
    |dg| reaches the weight with weight lr * (1 - momentum^t) / (1 - momentum), summed over t."""
    paths = sum((1 - momentum ** t) / (1 - momentum) for t in range(1, steps + 1))    # = steps without momentum
    return lr * paths * GRADIENT_ROUNDING


def assert_weights_close(expected, actual, atol: float, steps: int) -> None:
    """Trainable variables of two runs: `atol` from the optimizer's bound above, plus each of the
    `steps` updates rounding a weight once in each run (2 * steps * u relative; a LayerNorm
    gamma near 1 sees this)."""
    expected, actual = list(expected), list(actual)
    assert len(expected) == len(actual)
    for x, y in zip(expected, actual):
        np.testing.assert_allclose(y.numpy(), x.numpy(), rtol=2 * steps * U32, atol=atol, err_msg=x.name)


def binomial_atol(p, draws: int, z: float = 4.5):
    """Per-category bound on |frequency - p| over `draws` independent draws: z standard errors
    sqrt(p (1 - p) / draws). z = 4.5: a correct sampler fails a category with probability 6.8e-6
    (two-sided normal tail; the binomial tail is lighter still at these sizes)."""
    p = np.asarray(p, np.float64)
    return z * np.sqrt(p * (1 - p) / draws)
