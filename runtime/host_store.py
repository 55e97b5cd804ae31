"""A weight store on disk for weight streaming: parameters, gradients and the optimizer's slots
(Adam's m and v; SGD's momentum in m) as raw float32 files, memory-mapped one tensor at a time,
so a model whose training state exceeds host RAM still trains.

Layout under the store directory:
    param/<path>.f32  m/<path>.f32  v/<path>.f32  grad/<path>.f32    (path "/" -> "__")
    state.json        {"step", "iterations", "loss_scale", "good_steps", "clean"}: the counters of
                      the state in the files; "clean" is false while a step is writing them

A tensor is mapped only while it is used and unmapped after, so its pages leave this
process's resident set (the OS page cache may keep them, reclaimable). Large tensors are
processed in row chunks of `CHUNK_BYTES`.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
from typing import Iterator

import numpy as np

from config.files import atomic_write_text

KINDS = ("param", "m", "v", "grad")
CHUNK_BYTES = 64 << 20


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

    @contextlib.contextmanager
    def mapped(self, kind: str, path: str, mode: str = "r") -> Iterator[np.memmap]:
        """The tensor as a memory map (mode "r" or "r+"), unmapped when the block ends."""
        array = np.memmap(self.file(kind, path), dtype=np.float32, mode=mode, shape=self.shapes[path])
        try:
            yield array
        finally:
            if mode != "r":
                array.flush()
            del array

    def read(self, kind: str, path: str) -> np.ndarray:
        with self.mapped(kind, path) as array:
            return np.array(array)

    def write(self, kind: str, path: str, value: np.ndarray) -> None:
        mode = "r+" if os.path.exists(self.file(kind, path)) else "w+"
        array = np.memmap(self.file(kind, path), dtype=np.float32, mode=mode, shape=self.shapes[path])
        array[...] = value
        array.flush()
        del array

    def add(self, kind: str, path: str, value: np.ndarray, overwrite: bool) -> None:
        """value into the stored tensor (replacing it when `overwrite`)."""
        with self.mapped(kind, path, "r+") as array:
            if overwrite:
                array[...] = value
            else:
                array += value

    def row_chunks(self, path: str) -> Iterator[slice]:
        """Slices over the first axis, each about CHUNK_BYTES."""
        shape = self.shapes[path]
        rows = shape[0] if shape else 1
        row_bytes = 4 * math.prod(shape[1:]) if len(shape) > 1 else 4
        step = max(1, CHUNK_BYTES // max(row_bytes, 1))
        for start in range(0, rows, step):
            yield slice(start, min(rows, start + step))
