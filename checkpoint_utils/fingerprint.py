"""A content fingerprint of a model's weights, taken while a loader reads them anyway.

LoRA adapters are only meaningful on the base they were trained on, so a LoRA checkpoint
records its base's fingerprint and every later use (resume, merge, export) compares it. The
fingerprint is SHA-256 over every tensor's (path, dtype, shape, bytes) as the source stores them,
combined in path order, so it does not depend on the order of reading: the same files give the same
fingerprint, and other values, or the same values stored in another dtype, give another one.
SHA-256 runs at ~1.7 GB/s on one core here: ~7 s over GPT-J 6B's 12 GB in bfloat16, against a
minute of loading.
"""
from __future__ import annotations

import hashlib
from collections.abc import Iterator

import numpy as np

from config.params import ModelParams


def tensor_digest(path: str, array: np.ndarray) -> str:
    digest = hashlib.sha256(f"{path}|{array.dtype}|{list(array.shape)}|".encode())
    digest.update(np.ascontiguousarray(array).view(np.uint8).reshape(-1).data)
    return digest.hexdigest()


def combine(digests: dict[str, str]) -> str:
    return hashlib.sha256("".join(f"{p}={d}\n" for p, d in sorted(digests.items())).encode()).hexdigest()


class FingerprintedWeights:
    """A weight source (checkpoint_utils.weight_source) that fingerprints what it yields: after
    every tensor has been read, `fingerprint` is the weights' digest (None before)."""

    def __init__(self, inner):
        self.inner = inner
        self.description = inner.description
        self.digests: dict[str, str] = {}
        self.expected: int | None = None

    def check(self, model: ModelParams) -> None:
        self.inner.check(model)

    def arrays(self, model: ModelParams) -> Iterator[tuple[str, np.ndarray]]:
        from layers.weight_specs import weight_shapes
        self.expected = len(weight_shapes(model))
        for path, array in self.inner.arrays(model):
            self.digests[path] = tensor_digest(path, array)
            yield path, array

    @property
    def fingerprint(self) -> str | None:
        if self.expected is None or len(self.digests) < self.expected:
            return None
        return combine(self.digests)
