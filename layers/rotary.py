"""Rotary position embedding on the first `rotary_dim` dims of each head.

Two pairings of those dims are in use:
- "gptj": interleaved pairs (x0, x1), (x2, x3), ... each turned by one frequency;
- "neox": dim i paired with dim i + rotary_dim/2 (first half against second half).
Angles are computed in float32 (as the reference implementations do) and then cast.
"""
from __future__ import annotations

import tensorflow as tf

from layers.fusion import island


def rotary_angles(position_ids: tf.Tensor, rotary_dim: int, base: float) -> tf.Tensor:
    """position_ids [b, s] -> angles [b, s, rotary_dim/2], angle = position * base^(-2i/rotary_dim)."""
    exponents = tf.range(0, rotary_dim, 2, dtype=tf.float32) / float(rotary_dim)  # [r/2]
    inv_freq = 1.0 / tf.pow(tf.constant(base, tf.float32), exponents)             # [r/2]
    return tf.cast(position_ids, tf.float32)[..., None] * inv_freq                 # [b, s, r/2]


def rotary_sin_cos(position_ids: tf.Tensor, rotary_dim: int, base: float,
                   style: str) -> tuple[tf.Tensor, tf.Tensor]:
    """sin, cos laid out to match `style`'s pairing: each [b, s, 1, rotary_dim] (1 broadcasts over heads)."""
    angles = rotary_angles(position_ids, rotary_dim, base)  # [b, s, r/2]
    if style == "gptj":
        angles = tf.repeat(angles, 2, axis=-1)                # [b, s, r]: a0 a0 a1 a1 ...
    elif style == "neox":
        angles = tf.concat([angles, angles], axis=-1)         # [b, s, r]: a0 a1 ... a0 a1 ...
    else:
        raise ValueError(f"unknown rotary style {style!r}; use 'gptj' or 'neox'")
    return tf.sin(angles)[:, :, None, :], tf.cos(angles)[:, :, None, :]


def rotate_pairs(x: tf.Tensor, style: str) -> tf.Tensor:
    """The 90-degree turn of each pair: (a, b) -> (-b, a). x: [b, s, h, r]."""
    if style == "gptj":
        even, odd = x[..., ::2], x[..., 1::2]                  # [b, s, h, r/2] each
        return tf.reshape(tf.stack([-odd, even], axis=-1), tf.shape(x))
    first, second = tf.split(x, 2, axis=-1)
    return tf.concat([-second, first], axis=-1)


@island
def apply_rotary(x: tf.Tensor, sin: tf.Tensor, cos: tf.Tensor, style: str) -> tf.Tensor:
    """Rotate the first rotary_dim dims of every head of x [b, s, h, head_dim]; pass the rest."""
    rotary_dim = sin.shape[-1]
    x_rot, x_pass = x[..., :rotary_dim], x[..., rotary_dim:]
    sin, cos = tf.cast(sin, x.dtype), tf.cast(cos, x.dtype)
    rotated = x_rot * cos + rotate_pairs(x_rot, style) * sin
    return tf.concat([rotated, x_pass], axis=-1) if x_pass.shape[-1] else rotated
