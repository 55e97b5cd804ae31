"""Utilisation against a matmul peak measured on this device; the FLOPs per token come from
runtime/model_flops.py (TF-free, re-exported here)."""
from __future__ import annotations

import functools
import time

import tensorflow as tf

from config.params import Params
from runtime.model_flops import training_flops_per_token  # noqa: F401  (re-exported)


@functools.lru_cache(maxsize=None)
def measure_matmul_peak(dtype: str = "float32", size: int = 1024, seconds: float = 0.5) -> float:
    """FLOP/s of a square matmul on the default device: the practical peak MFU is measured against."""
    a = tf.random.stateless_normal([size, size], seed=[1, 2], dtype=dtype)
    b = tf.random.stateless_normal([size, size], seed=[3, 4], dtype=dtype)

    @tf.function
    def run(n):
        total = tf.zeros([], dtype)
        for _ in tf.range(n):
            total += tf.reduce_sum(tf.matmul(a, b))  # the sum keeps the matmul from being pruned
        return total

    run(tf.constant(2)).numpy()  # compile and warm up
    count = 4
    while True:
        start = time.perf_counter()
        run(tf.constant(count)).numpy()
        elapsed = time.perf_counter() - start
        if elapsed >= seconds or count >= 1 << 16:
            return 2.0 * size ** 3 * count / elapsed
        count *= 2


class FlopsCounter:
    def __init__(self, params: Params):
        sequence = params.train_input.max_sequence_length if params.train_input else params.model.max_position_embeddings
        self.flops_per_token = training_flops_per_token(params.model, sequence)
        self.dtype = params.model.compute_dtype
        self._peak: float | None = None

    def utilisation(self, tokens_per_second: float) -> float:
        """Model FLOPs utilisation: achieved model FLOP/s over the measured matmul peak."""
        if self._peak is None:
            self._peak = measure_matmul_peak(self.dtype)
        return tokens_per_second * self.flops_per_token / self._peak
