"""Tokenizing batches of documents in worker processes, results in submission order.

Workers are started with "spawn" (not fork) because the parent may already hold
TensorFlow's threads; each builds the tokenizer once from its JSON (handed over in a
temporary file) and runs it on one thread (one process per core already). A task
function (`tokenize_documents` by default, any module-level function of (tokenizer,
texts)) turns a batch of texts into NumPy arrays in the worker, so only flat arrays cross
the process border, never lists of Python ints.
Results come back in the order the batches were submitted, which keeps the output
deterministic; at most `ahead` batches per worker are in flight, enough that a slow batch
(one huge document) does not leave the other workers idle, and bounded so a huge corpus
is never read ahead into memory. With `workers=0` the batches are tokenized in this
process (the Rust side may still use its own threads).
"""
from __future__ import annotations

import collections
import multiprocessing
import os
import tempfile
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

try:
    import fcntl
except ImportError:        # Windows
    fcntl = None

from input.records import encode_varints
from input.tokenizer import GptTokenizer

__all__ = ["tokenize_documents", "tokenize_to_varints", "TokenizePool"]

# The tokenizer of a worker process, built once by `_init_worker` (multiprocessing has no
# other way to hand per-process state to the task function).
_worker_tokenizer: GptTokenizer | None = None


def tokenize_documents(tokenizer: GptTokenizer, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(tokens int32 [total], lengths int64 [docs]) with EOS appended after every document."""
    encoded = tokenizer.encode_batch(texts)
    lengths = np.fromiter((len(ids) + 1 for ids in encoded), dtype=np.int64, count=len(encoded))
    ends = np.cumsum(lengths)                                       # [docs] position after each EOS
    tokens = np.empty(int(ends[-1]) if len(ends) else 0, dtype=np.int32)
    tokens[ends - 1] = tokenizer.eos_id
    for ids, end in zip(encoded, ends.tolist()):
        tokens[end - 1 - len(ids):end - 1] = ids                    # list -> int32 in C, no Python per token
    return tokens, lengths


def tokenize_to_varints(tokenizer: GptTokenizer, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`tokenize_documents` plus the protobuf varint bytes of the tokens, for the record writer.

    Returns (tokens [n], lengths int64 [docs], varints uint8 [bytes]); tokens are uint16 when
    the vocab fits (GPT-2's does), else int32, and `varint_offsets(varints)` locates each
    token's bytes. The per-token work runs in the workers, and what crosses the process
    border is about 4 bytes a token.
    """
    tokens, lengths = tokenize_documents(tokenizer, texts)
    if tokenizer.vocab_size <= 1 << 16:
        tokens = tokens.astype(np.uint16)
    return tokens, lengths, encode_varints(tokens)[0]


def _init_worker(tokenizer_path: str, eos_token: str) -> None:
    global _worker_tokenizer
    os.environ["TOKENIZERS_PARALLELISM"] = "false"   # one process per core already
    with open(tokenizer_path, encoding="utf-8") as f:
        _worker_tokenizer = GptTokenizer.from_json(f.read(), eos_token=eos_token)


def _widen_pipes(pool, size: int = 1 << 20) -> None:
    """Let the pool's task and result pipes hold a whole batch (Linux; elsewhere nothing changes).

    A pipe holds 64 KiB by default, a task (256 KiB of text) or its result (~4 bytes a
    token) several times that, so each crossed in pieces: the worker waited for the parent's
    feeder or receiver thread, which runs only when it gets the GIL back from the main
    thread (packing, writing) and a core. Measured under load: workers idle between tasks
    4-6% of their time with 64 KiB pipes, 2% with 1 MiB. Uses the pool's private queues,
    hence the guard.
    """
    set_size = getattr(fcntl, "F_SETPIPE_SZ", None)        # Linux only
    if set_size is None:
        return
    try:
        with open("/proc/sys/fs/pipe-max-size", encoding="ascii") as f:
            size = min(size, int(f.read()))
        for end in (pool._inqueue._writer, pool._outqueue._reader):
            fcntl.fcntl(end.fileno(), set_size, size)
    except (AttributeError, OSError, ValueError):
        pass


def _run_in_worker(task: Callable[[GptTokenizer, Sequence[str]], tuple], texts: Sequence[str]) -> tuple:
    return task(_worker_tokenizer, texts)


class TokenizePool:
    """Context manager mapping document batches to token arrays, in order, with bounded look-ahead."""

    def __init__(self, tokenizer: GptTokenizer, workers: int,
                 task: Callable[[GptTokenizer, Sequence[str]], tuple] = tokenize_documents, ahead: int = 4):
        self.tokenizer = tokenizer
        self.workers = workers
        self.task = task
        self.ahead = ahead
        self._pool = None
        self._folder: tempfile.TemporaryDirectory | None = None

    def __enter__(self) -> "TokenizePool":
        if self.workers > 0:
            # The tokenizer goes to the workers as a file, not as an initializer argument: spawn
            # writes a start-up payload bigger than a pipe buffer (64 KiB; a tokenizer JSON is
            # 0.5-2 MB) synchronously, so each worker would wait for the previous one to start.
            self._folder = tempfile.TemporaryDirectory(prefix="tokenize_pool_")
            path = os.path.join(self._folder.name, "tokenizer.json")
            with open(path, "w", encoding="utf-8") as f:
                f.write(self.tokenizer.to_json())
            context = multiprocessing.get_context("spawn")
            self._pool = context.Pool(self.workers, initializer=_init_worker,
                                      initargs=(path, self.tokenizer.eos_token))
            _widen_pipes(self._pool)
        return self

    def __exit__(self, *exc) -> None:
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()
            self._pool = None
        if self._folder is not None:
            self._folder.cleanup()
            self._folder = None

    def map(self, batches: Iterable[tuple[Any, Sequence[str]]]) -> Iterator[tuple]:
        """For each (key, texts) yield (key, *task(tokenizer, texts)), in input order."""
        if self._pool is None:
            for key, texts in batches:
                yield (key, *self.task(self.tokenizer, texts))
            return
        pending: collections.deque = collections.deque()
        for key, texts in batches:
            pending.append((key, self._pool.apply_async(_run_in_worker, (self.task, texts))))
            if len(pending) >= self.ahead * self.workers:
                key, result = pending.popleft()
                yield (key, *result.get())
        while pending:
            key, result = pending.popleft()
            yield (key, *result.get())
