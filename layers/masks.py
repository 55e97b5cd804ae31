"""Additive attention biases: 0 where a query may attend to a key, a large negative elsewhere."""
from __future__ import annotations

import tensorflow as tf

# Finite, so a fully masked row (a left-padding query) softmaxes to uniform instead of NaN.
MASKED = -1e9


def causal_attention_bias(query_slots: tf.Tensor, key_valid: tf.Tensor) -> tf.Tensor:
    """query_slots [s_q], or [b, s_q] when rows sit at different slots (index of each query in
    the key axis), key_valid [b, s_k] (1 = a real token) -> float32 bias [b, 1, s_q, s_k]: a
    query sees valid keys at or before its own slot."""
    key_slots = tf.range(tf.shape(key_valid)[1])                         # [s_k]
    query_slots = tf.cast(query_slots, tf.int32)
    if query_slots.shape.rank == 1:
        # [None, :, :], not [None]: DTensor (TF 2.21) crashes laying out a bare new axis (runtime/mesh.py).
        causal = (key_slots[None, :] <= query_slots[:, None])[None, :, :]   # [1, s_q, s_k]
    else:
        causal = key_slots[None, None, :] <= query_slots[:, :, None]     # [b, s_q, s_k]
    allowed = tf.logical_and(causal, tf.cast(key_valid, tf.bool)[:, None, :])  # [b, s_q, s_k]
    return tf.where(allowed, 0.0, MASKED)[:, None, :, :]
