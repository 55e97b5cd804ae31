"""LayerNorm over the last axis, computed in float32 whatever the compute dtype."""
from __future__ import annotations

import tensorflow as tf

from layers import initializers
from layers.base import Layer, weight_variable


class LayerNorm(Layer):
    FLOAT32_WEIGHTS = ("gamma", "beta")     # used in float32 whatever the compute dtype

    def __init__(self, dim: int, epsilon: float, name: str | None = None):
        super().__init__(name=name)
        self.epsilon = epsilon
        self.gamma = weight_variable(initializers.ones, [dim], "gamma")  # [D]
        self.beta = weight_variable(initializers.zeros, [dim], "beta")   # [D]

    def forward(self, weights: dict, x: tf.Tensor) -> tf.Tensor:
        x32 = tf.cast(x, tf.float32)  # [..., D]
        mean, variance = tf.nn.moments(x32, axes=[-1], keepdims=True)
        normed = (x32 - mean) * tf.math.rsqrt(variance + self.epsilon)
        return tf.cast(normed * weights["gamma"] + weights["beta"], x.dtype)
