"""Token embedding table; also the LM head when `share_embedding_weights` ties them."""
from __future__ import annotations

from typing import Callable

import tensorflow as tf

from layers.base import Layer
from layers.dense import matmul_rows


class TokenEmbedding(Layer):
    def __init__(self, vocab_size: int, hidden_size: int, init: Callable, name: str | None = None):
        super().__init__(name=name)
        self.embeddings = tf.Variable(init([vocab_size, hidden_size]), name="embeddings")  # [V, D]

    def forward(self, weights: dict, token_ids: tf.Tensor, dtype: tf.DType) -> tf.Tensor:
        # token_ids: [b, s] -> [b, s, D]
        return tf.cast(tf.gather(weights["embeddings"], token_ids), dtype)

    @staticmethod
    def attend(weights: dict, hidden: tf.Tensor) -> tf.Tensor:
        """Tied LM head: hidden [b, s, D] @ embeddings^T -> logits [b, s, V]."""
        return matmul_rows(hidden, tf.cast(weights["embeddings"], hidden.dtype), transpose_kernel=True)
