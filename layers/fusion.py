"""XLA islands in a graph-mode step: elementwise-heavy functions compiled by XLA (which fuses
their many passes over memory into one loop) inside a step whose matmuls stay on TensorFlow's
own kernels (on CPU: oneDNN, whose 16-bit matmuls use AVX-512 BF16 / AMX where XLA:CPU does not).

The runtime turns islands on while it traces a graph-mode step (`fusion_islands(True)`);
a function decorated with `island` is then called as a `tf.function(jit_compile=True)` (its
gradient is compiled too). Elsewhere (eager code, XLA steps, where the whole step is one
cluster already) it runs as plain ops.
"""
from __future__ import annotations

import contextlib
import functools
import threading
from typing import Callable

import tensorflow as tf

_state = threading.local()


def islands_enabled() -> bool:
    return getattr(_state, "enabled", False)


@contextlib.contextmanager
def fusion_islands(enabled: bool):
    """Within this block, traced calls of `island` functions become XLA clusters (when enabled)."""
    previous = islands_enabled()
    _state.enabled = enabled
    try:
        yield
    finally:
        _state.enabled = previous


def island(function: Callable) -> Callable:
    """`function` run as an XLA cluster when islands are enabled at trace time (see module doc)."""
    compiled = tf.function(function, jit_compile=True, reduce_retracing=True)

    @functools.wraps(function)
    def call(*args, **kwargs):
        return compiled(*args, **kwargs) if islands_enabled() else function(*args, **kwargs)
    return call
