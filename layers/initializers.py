"""Deterministic initial values: every variable draws from (seed, creation index)."""
from __future__ import annotations

import tensorflow as tf

from config.params import InitializerParams


class SeedStream:
    """Hands out distinct stateless seeds in creation order, so a model's initial
    weights depend only on the run seed and its architecture."""

    def __init__(self, seed: int):
        self._seed = int(seed)
        self._count = 0

    def next(self) -> tf.Tensor:
        self._count += 1
        return tf.constant([self._seed, self._count], dtype=tf.int64)


class Initializer:
    def __init__(self, config: InitializerParams, seeds: SeedStream):
        self.config = config
        self.seeds = seeds

    def __call__(self, shape) -> tf.Tensor:
        draw = (tf.random.stateless_truncated_normal if self.config.name == "truncated_normal"
                else tf.random.stateless_normal)
        return draw(shape, seed=self.seeds.next(), mean=self.config.mean,
                    stddev=self.config.stddev, dtype=tf.float32)


def zeros(shape) -> tf.Tensor:
    return tf.zeros(shape, tf.float32)


def ones(shape) -> tf.Tensor:
    return tf.ones(shape, tf.float32)
