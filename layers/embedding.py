"""Token embedding table; also the LM head when `share_embedding_weights` ties them."""
from __future__ import annotations

from typing import Callable

import tensorflow as tf

from layers.base import Layer, weight_variable
from layers.dense import as_float, matmul_rows


class TokenEmbedding(Layer):
    def __init__(self, vocab_size: int, hidden_size: int, init: Callable, name: str | None = None):
        super().__init__(name=name)
        self.embeddings = weight_variable(init, [vocab_size, hidden_size], "embeddings")  # [V, D]

    def forward(self, weights: dict, token_ids: tf.Tensor, dtype: tf.DType) -> tf.Tensor:
        # token_ids: [b, s] -> [b, s, D]. Gathered from the table's value, not the variable: DTensor
        # cannot expand a variable's ResourceGather over a vocabulary-split table (runtime/mesh.py).
        # A bfloat16 table is held as its int16 bits (generation.weights.bfloat16_table): XLA:CPU
        # would convert a bfloat16 operand of the gather to float32, a copy of the whole table.
        table = tf.convert_to_tensor(weights["embeddings"])                # [V, D]
        return tf.cast(as_float(tf.gather(table, token_ids)), dtype)

    @staticmethod
    def attend(weights: dict, hidden: tf.Tensor) -> tf.Tensor:
        """Tied LM head: hidden [b, s, D] @ embeddings^T -> logits [b, s, V]."""
        return matmul_rows(hidden, tf.cast(as_float(weights["embeddings"]), hidden.dtype), transpose_kernel=True)
