"""Write a whole output directory atomically: build it beside the target, then swap it in.

A run killed half-way leaves the previous contents (or nothing) in place, never a mix.
An existing directory is only replaced when it holds the same model."""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from typing import Callable, Iterator


class OutputDirError(ValueError):
    """The output directory cannot be used as asked."""


@contextlib.contextmanager
def atomic_directory(target: str, describe_existing: Callable[[str], str | None]) -> Iterator[str]:
    """Yield a fresh temporary directory that replaces `target` when the block succeeds.

    `describe_existing(target)` returns None when the existing target holds the same model
    (it may then be replaced) or a short description of what it holds instead."""
    target = os.path.abspath(target)
    if os.path.exists(target) and not os.path.isdir(target):
        raise OutputDirError(f"--output-dir {target} is a file; choose a directory path")
    if os.path.isdir(target) and os.listdir(target):
        different = describe_existing(target)
        if different is not None:
            raise OutputDirError(f"--output-dir {target} already holds {different}; choose another "
                                 "directory or delete it first (nothing was written)")
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    work = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.tmp-", dir=parent)
    try:
        yield work
        if os.path.isdir(target):
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.old-", dir=parent)
            os.replace(target, os.path.join(old, "previous"))
            os.replace(work, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(work, target)
    finally:
        if os.path.isdir(work):
            shutil.rmtree(work, ignore_errors=True)
