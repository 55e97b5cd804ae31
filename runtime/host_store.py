"""A weight store on disk for weight streaming: parameters, gradients and the optimizer's slots
(Adam's m and v; SGD's momentum in m) as raw float32 files, read and written one tensor (or row
chunk) at a time, so a model whose training state exceeds host RAM still trains.

Layout under the store directory:
    param/<path>.f32  m/<path>.f32  v/<path>.f32  grad/<path>.f32    (path "/" -> "__")
    state.json        {"step", "iterations", "loss_scale", "good_steps", "clean"}: the counters of
                      the state in the files; "clean" is false while a step is writing them

Tensors are read and written with plain file reads and writes of whole tensors or of row chunks
of `CHUNK_BYTES` (`update_in_chunks`), not through memory maps: a write through a map first
faults the old page in from disk, and faulting 4 KiB pages is slower than one large read. Only
the arrays in use are in this process's memory (the OS page cache may keep file pages,
reclaimable). Several threads may work on different tensors at once.
"""
from __future__ import annotations

import json
import math
import os
from typing import Iterator

import numpy as np

from checkpoint_utils.host_arrays import aligned_empty
from config.files import atomic_write_text

KINDS = ("param", "m", "v", "grad")
CHUNK_BYTES = 16 << 20


class DiskStore:
    def __init__(self, directory: str, shapes: dict[str, tuple[int, ...]]):
        self.directory = directory
        self.shapes = shapes

    def file(self, kind: str, path: str) -> str:
        return os.path.join(self.directory, kind, path.replace("/", "__") + ".f32")

    @property
    def state_file(self) -> str:
        return os.path.join(self.directory, "state.json")

    def exists(self) -> bool:
        return os.path.exists(self.state_file)

    def read_state(self) -> dict:
        with open(self.state_file, encoding="utf-8") as f:
            return json.load(f)

    def write_state(self, state: dict) -> None:
        atomic_write_text(self.state_file, json.dumps(state, indent=2))

    def create(self, values, state: dict) -> None:
        """Write initial parameters (an iterator of (path, array)), zero slots and gradients."""
        for kind in KINDS:
            os.makedirs(os.path.join(self.directory, kind), exist_ok=True)
        for path, array in values:
            self.write("param", path, array)
        for path, shape in self.shapes.items():
            for kind in ("m", "v", "grad"):
                with open(self.file(kind, path), "wb") as f:  # sparse zeros: no writes needed
                    f.truncate(4 * math.prod(shape))
        self.write_state(state)

    def _row_bytes(self, path: str) -> int:
        shape = self.shapes[path]
        return 4 * math.prod(shape[1:]) if len(shape) > 1 else 4

    def read(self, kind: str, path: str) -> np.ndarray:
        """The whole tensor, in a 64-byte aligned buffer (TensorFlow adopts it without a copy)."""
        array = aligned_empty(self.shapes[path], np.float32)
        with open(self.file(kind, path), "rb", buffering=0) as f:
            _read_into(f, array, 0)
        return array

    def write(self, kind: str, path: str, value: np.ndarray) -> None:
        value = np.ascontiguousarray(value, np.float32).reshape(self.shapes[path])
        mode = "r+b" if os.path.exists(self.file(kind, path)) else "wb"
        with open(self.file(kind, path), mode, buffering=0) as f:
            _write_from(f, value, 0)

    def add(self, kind: str, path: str, value: np.ndarray, overwrite: bool) -> np.ndarray:
        """value into the stored tensor (replacing it when `overwrite`); returns what was stored."""
        if not overwrite:
            value = self.read(kind, path) + value
        self.write(kind, path, value)
        return value

    def update_in_chunks(self, path: str, kinds: tuple[str, ...], changed: tuple[str, ...], update) -> None:
        """For each row chunk of tensor `path`: read it from every store in `kinds`, call
        update({kind: chunk}) (which changes the chunks in place) and write the chunks of `changed` back."""
        files = {kind: open(self.file(kind, path), "r+b" if kind in changed else "rb", buffering=0)
                 for kind in kinds}
        try:
            row_bytes = self._row_bytes(path)
            shape = self.shapes[path]
            for rows in self.row_chunks(path):
                offset = rows.start * row_bytes
                chunk_shape = (rows.stop - rows.start,) + tuple(shape[1:]) if shape else ()
                chunks = {}
                for kind, f in files.items():
                    chunks[kind] = np.empty(chunk_shape, np.float32)
                    _read_into(f, chunks[kind], offset)
                update(chunks)
                for kind in changed:
                    _write_from(files[kind], chunks[kind], offset)
        finally:
            for f in files.values():
                f.close()

    def row_chunks(self, path: str) -> Iterator[slice]:
        """Slices over the first axis, each about CHUNK_BYTES."""
        shape = self.shapes[path]
        rows = shape[0] if shape else 1
        step = max(1, CHUNK_BYTES // self._row_bytes(path))
        for start in range(0, rows, step):
            yield slice(start, min(rows, start + step))


def _read_into(f, array: np.ndarray, offset: int) -> None:
    """Fill the C-contiguous `array` from file `f` at byte `offset`."""
    view = memoryview(array.reshape(-1).view(np.uint8))
    done = 0
    while done < len(view):
        count = os.preadv(f.fileno(), [view[done:]], offset + done)
        if count == 0:
            raise EOFError(f"{f.name} is shorter than its tensor ({offset + len(view)} bytes)")
        done += count


def _write_from(f, array: np.ndarray, offset: int) -> None:
    """Write the C-contiguous `array` to file `f` at byte `offset`."""
    view = memoryview(np.ascontiguousarray(array).reshape(-1).view(np.uint8))
    done = 0
    while done < len(view):
        done += os.pwrite(f.fileno(), view[done:], offset + done)
