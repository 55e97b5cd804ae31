"""Write a whole output directory atomically: build it beside the target, then swap it in.

A run killed half-way leaves the previous contents (or nothing) in place, never a mix.
An existing directory is only replaced when it holds the same model, and then only the
writer's own files change: anything else the user put there (notes, a README, their own
files) is carried into the new directory before the swap.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import stat
import tempfile
from typing import Callable, Iterator

from config.files import current_umask


class OutputDirError(ValueError):
    """The output directory cannot be used as asked."""


def _link_or_copy(source: str, target: str) -> None:
    """A hard link (no bytes copied; the old directory is deleted after the swap), else a copy."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def _carry_over(old: str, new: str, is_own: Callable[[str], bool]) -> None:
    """Bring the entries of `old` that the writer neither wrote again nor owns into `new`."""
    for name in os.listdir(old):
        source, target = os.path.join(old, name), os.path.join(new, name)
        if os.path.lexists(target) or is_own(name):
            continue
        if os.path.islink(source):
            os.symlink(os.readlink(source), target)
        elif os.path.isdir(source):
            shutil.copytree(source, target, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(source, target)


@contextlib.contextmanager
def atomic_directory(target: str, describe_existing: Callable[[str], str | None],
                     is_own: Callable[[str], bool]) -> Iterator[str]:
    """Yield a fresh temporary directory that replaces `target` when the block succeeds.

    `describe_existing(target)` returns None when the existing target holds the same model
    (it may then be replaced) or a short description of what it holds instead. `is_own(name)`
    tells the writer's own file names: those the new directory lacks are dropped (an earlier
    export's extra shards), every other entry of the old directory is kept."""
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
    # mkdtemp makes 0700; the output gets the old directory's mode, or what the umask gives.
    os.chmod(work, stat.S_IMODE(os.stat(target).st_mode) if os.path.isdir(target) else 0o777 & ~current_umask())
    try:
        yield work
        if os.path.isdir(target):
            _carry_over(target, work, is_own)
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.old-", dir=parent)
            os.replace(target, os.path.join(old, "previous"))
            os.replace(work, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(work, target)
    finally:
        if os.path.isdir(work):
            shutil.rmtree(work, ignore_errors=True)
