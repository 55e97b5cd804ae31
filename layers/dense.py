"""Affine projection y = x @ kernel (+ bias); kernel stored [in, out] (HF Linear stores [out, in])."""
from __future__ import annotations

from typing import Callable

import tensorflow as tf

from layers import initializers
from layers.base import Layer


class Dense(Layer):
    def __init__(self, in_dim: int, out_dim: int, use_bias: bool,
                 kernel_init: Callable, name: str | None = None):
        super().__init__(name=name)
        self.kernel = tf.Variable(kernel_init([in_dim, out_dim]), name="kernel")  # [in, out]
        if use_bias:
            self.bias = tf.Variable(initializers.zeros([out_dim]), name="bias")  # [out]

    def forward(self, weights: dict, x: tf.Tensor) -> tf.Tensor:
        # x: [..., in] in the compute dtype; weights are cast to it (mixed precision).
        y = tf.matmul(x, tf.cast(weights["kernel"], x.dtype))  # [..., out]
        if "bias" in weights:
            y = y + tf.cast(weights["bias"], x.dtype)
        return y
