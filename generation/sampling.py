"""Choosing the next token from processed scores: argmax, or a seeded random draw."""
from __future__ import annotations

import numpy as np
import tensorflow as tf


def greedy_tokens(scores: tf.Tensor) -> tf.Tensor:
    """scores [b, V] -> [b] int32: the highest-scoring token (on CPU the lowest id among exact ties)."""
    return tf.argmax(scores, axis=-1, output_type=tf.int32)


def gumbel_noise(seeds: tf.Tensor, step: tf.Tensor, width: int, streams: tf.Tensor | None = None) -> tf.Tensor:
    """[b, width] standard Gumbel noise. Row r's comes from a stateless generator keyed by
    (seeds[r], streams[r] and step), so it depends on nothing else: not on the other rows of
    the batch, not on RNG state. seeds [b] int64; streams [b] int64 (default 0): which of a
    request's num_return_sequences samples the row is; stream 0 is keyed (seed, step) exactly."""
    step = tf.cast(step, tf.int64)
    counters = step if streams is None else tf.cast(streams, tf.int64) * 2 ** 32 + step   # scalar or [b]
    counters = tf.broadcast_to(counters, [seeds.shape[0]])
    tiny = float(np.finfo(np.float32).tiny)   # keeps log(uniform) finite
    noise = []
    for row in range(seeds.shape[0]):       # the batch is static; a few small RNG ops per step
        uniform = tf.random.stateless_uniform([width], seed=tf.stack([seeds[row], counters[row]]),
                                              minval=tiny, maxval=1.0, dtype=tf.float32, alg="philox")
        noise.append(-tf.math.log(-tf.math.log(uniform)))
    return tf.stack(noise)


def sample_tokens(scores: tf.Tensor, seeds: tf.Tensor, step: tf.Tensor,
                  streams: tf.Tensor | None = None) -> tf.Tensor:
    """scores [b, V] (unnormalised log-probabilities, -inf = excluded), seeds [b] int64,
    step: index of the token being chosen, streams [b] -> [b] int32 drawn from softmax(scores).

    Gumbel-max: argmax(scores + Gumbel noise) is a draw from softmax(scores); with the noise of
    `gumbel_noise`, a request's tokens depend only on its own seed (and stream) and the scores."""
    return greedy_tokens(scores + gumbel_noise(seeds, step, scores.shape[-1], streams))


def sample_without_replacement(scores: tf.Tensor, seeds: tf.Tensor, step: tf.Tensor, count: int) -> tf.Tensor:
    """scores [b, N] -> [b, count] int32 indices drawn from softmax(scores) one after another
    without replacement, in draw order (Gumbel-top-k: the `count` largest perturbed scores)."""
    return tf.math.top_k(scores + gumbel_noise(seeds, step, scores.shape[-1]), count).indices
