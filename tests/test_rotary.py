"""Rotary embedding against an independent NumPy reference (pairs as complex numbers)."""
from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from layers.rotary import apply_rotary, rotary_sin_cos
from tests.numerics import U32

pytestmark = pytest.mark.numerics


def rotation_atol(x: np.ndarray, max_position: int) -> float:
    """float32 rotary vs a float64 reference: the angle position * base^(-2i/r) carries ~3
    roundings (|d theta| <= 3 u theta), sin and cos ~2 more; turning a pair of norm
    <= sqrt(2) max|x| by an angle off by d is off by that norm times d."""
    return 2 ** 0.5 * np.abs(x).max() * (3 * max_position + 2) * U32


def numpy_rotary(x: np.ndarray, positions: np.ndarray, rotary_dim: int, base: float, style: str) -> np.ndarray:
    """x [b, s, h, d]: turn each pair of the first rotary_dim dims by position * base^(-2i/r)."""
    half = rotary_dim // 2
    theta = positions[..., None].astype(np.float64) * base ** (-np.arange(half) * 2.0 / rotary_dim)  # [b, s, r/2]
    turn = np.exp(1j * theta)[:, :, None, :]                                                        # [b, s, 1, r/2]
    out = x.astype(np.float64).copy()
    if style == "gptj":
        pairs = x[..., 0:rotary_dim:2] + 1j * x[..., 1:rotary_dim:2]
        turned = pairs * turn
        out[..., 0:rotary_dim:2], out[..., 1:rotary_dim:2] = turned.real, turned.imag
    else:
        pairs = x[..., :half] + 1j * x[..., half:rotary_dim]
        turned = pairs * turn
        out[..., :half], out[..., half:rotary_dim] = turned.real, turned.imag
    return out


@pytest.mark.parametrize("style", ["gptj", "neox"])
@pytest.mark.parametrize("rotary_dim,head_dim", [(4, 16), (16, 16), (2, 6)])
def test_matches_numpy_reference(style, rotary_dim, head_dim):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 7, 3, head_dim)).astype(np.float32)
    positions = np.array([np.arange(7), np.arange(7) + 40])
    sin, cos = rotary_sin_cos(tf.constant(positions), rotary_dim, 10000.0, style)
    ours = apply_rotary(tf.constant(x), sin, cos, style).numpy()
    np.testing.assert_allclose(ours, numpy_rotary(x, positions, rotary_dim, 10000.0, style),
                               atol=rotation_atol(x, positions.max()))                  # ~4e-5 here
    np.testing.assert_array_equal(ours[..., rotary_dim:], x[..., rotary_dim:])


def test_relative_position_property():
    """q.k after rotation depends only on the position difference (full rotary)."""
    rng = np.random.default_rng(1)
    q, k = rng.standard_normal((2, 1, 1, 1, 8)).astype(np.float32)

    def score(pq, pk):
        out = []
        for vec, pos in ((q, pq), (k, pk)):
            sin, cos = rotary_sin_cos(tf.constant([[pos]]), 8, 10000.0, "gptj")
            out.append(apply_rotary(tf.constant(vec), sin, cos, "gptj").numpy().ravel())
        return float(out[0] @ out[1])

    # 8-dim q.k of standard normals (|q| |k| <= 8): each rotated vector is off by <= |v| * 41 u
    # (rotation_atol at position 13), the dot product rounds 8 u more: ~3e-5 apart at most
    assert score(5, 2) == pytest.approx(score(13, 10), abs=1e-4)
    assert score(5, 2) != pytest.approx(score(5, 4), abs=1e-3)       # another offset: O(1) apart
