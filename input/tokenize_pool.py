"""Tokenizing batches of documents in worker processes, results in submission order.

Workers are started with "spawn" (not fork) because the parent may already hold
TensorFlow's threads; each builds the tokenizer once from its JSON. Results come back in
the order the batches were submitted, which keeps the output deterministic, and at most
`2 * workers` batches are in flight so a huge corpus is never read ahead into memory.
With `workers=0` the batches are tokenized in this process (the Rust side may still use
its own threads).
"""
from __future__ import annotations

import collections
import multiprocessing
import os
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from input.tokenizer import GptTokenizer

__all__ = ["tokenize_documents", "TokenizePool"]

# The tokenizer of a worker process, built once by `_init_worker` (multiprocessing has no
# other way to hand per-process state to the task function).
_worker_tokenizer: GptTokenizer | None = None


def tokenize_documents(tokenizer: GptTokenizer, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(tokens int32 [total], lengths int64 [docs]) with EOS appended after every document."""
    encoded = tokenizer.encode_batch(texts)
    lengths = np.fromiter((len(ids) + 1 for ids in encoded), dtype=np.int64, count=len(encoded))
    tokens = np.empty(int(lengths.sum()), dtype=np.int32)
    position = 0
    for ids in encoded:
        tokens[position:position + len(ids)] = ids
        position += len(ids)
        tokens[position] = tokenizer.eos_id
        position += 1
    return tokens, lengths


def _init_worker(tokenizer_json: str, eos_token: str) -> None:
    global _worker_tokenizer
    os.environ["TOKENIZERS_PARALLELISM"] = "false"   # one process per core already
    _worker_tokenizer = GptTokenizer.from_json(tokenizer_json, eos_token=eos_token)


def _tokenize_in_worker(texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    return tokenize_documents(_worker_tokenizer, texts)


class TokenizePool:
    """Context manager mapping document batches to token arrays, in order, with bounded look-ahead."""

    def __init__(self, tokenizer: GptTokenizer, workers: int):
        self.tokenizer = tokenizer
        self.workers = workers
        self._pool = None

    def __enter__(self) -> "TokenizePool":
        if self.workers > 0:
            context = multiprocessing.get_context("spawn")
            self._pool = context.Pool(self.workers, initializer=_init_worker,
                                      initargs=(self.tokenizer.to_json(), self.tokenizer.eos_token))
        return self

    def __exit__(self, *exc) -> None:
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()
            self._pool = None

    def map(self, batches: Iterable[tuple[Any, Sequence[str]]]) -> Iterator[tuple[Any, np.ndarray, np.ndarray]]:
        """For each (key, texts) yield (key, tokens, lengths), in input order."""
        if self._pool is None:
            for key, texts in batches:
                yield (key, *tokenize_documents(self.tokenizer, texts))
            return
        pending: collections.deque = collections.deque()
        for key, texts in batches:
            pending.append((key, self._pool.apply_async(_tokenize_in_worker, (texts,))))
            if len(pending) >= 2 * self.workers:
                key, result = pending.popleft()
                yield (key, *result.get())
        while pending:
            key, result = pending.popleft()
            yield (key, *result.get())
