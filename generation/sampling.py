"""Choosing the next token from processed scores: argmax, or a seeded random draw."""
from __future__ import annotations

import numpy as np
import tensorflow as tf


def greedy_tokens(scores: tf.Tensor) -> tf.Tensor:
    """scores [b, V] -> [b] int32: the highest-scoring token (on CPU the lowest id among exact ties)."""
    return tf.argmax(scores, axis=-1, output_type=tf.int32)


def sample_tokens(scores: tf.Tensor, seeds: tf.Tensor, step: tf.Tensor,
                  streams: tf.Tensor | None = None) -> tf.Tensor:
    """scores [b, V] (unnormalised log-probabilities, -inf = excluded), seeds [b] int64,
    step: index of the token being chosen, streams [b] int64 (default 0): which of a request's
    num_return_sequences samples the row is -> [b] int32 drawn from softmax(scores).

    Gumbel-max: argmax(scores + Gumbel noise) is a draw from softmax(scores). Each row's noise
    comes from a stateless generator keyed by (its seed, its stream and step), so a request's
    tokens depend only on its own seed and the scores, not on the other rows of the batch or on
    RNG state; stream 0 is keyed (seed, step) exactly."""
    vocab = scores.shape[-1]
    step = tf.cast(step, tf.int64)
    counters = step if streams is None else tf.cast(streams, tf.int64) * 2 ** 32 + step   # scalar or [b]
    counters = tf.broadcast_to(counters, [scores.shape[0]])
    tiny = float(np.finfo(np.float32).tiny)   # keeps log(uniform) finite
    noise = []
    for row in range(scores.shape[0]):      # the batch is static; a few small RNG ops per step
        uniform = tf.random.stateless_uniform([vocab], seed=tf.stack([seeds[row], counters[row]]),
                                              minval=tiny, maxval=1.0, dtype=tf.float32, alg="philox")
        noise.append(-tf.math.log(-tf.math.log(uniform)))
    return greedy_tokens(scores + tf.stack(noise))
