"""What "nothing changed on disk" compares: a snapshot of every file under a directory."""
from __future__ import annotations

import hashlib
import os


def snapshot(root: str) -> dict[str, tuple[int, str]]:
    """{path relative to root: (size, sha256 of the content)} of every file under root."""
    files = {}
    for directory, _, names in os.walk(root):
        for name in names:
            path = os.path.join(directory, name)
            with open(path, "rb") as f:
                files[os.path.relpath(path, root)] = (os.path.getsize(path), hashlib.sha256(f.read()).hexdigest())
    return files


def disk_changes(before: dict, after: dict) -> list[str]:
    """What differs between two snapshots, one line per file."""
    return ([f"changed: {p}" for p in sorted(before) if p in after and after[p] != before[p]]
            + [f"removed: {p}" for p in sorted(set(before) - set(after))]
            + [f"added: {p}" for p in sorted(set(after) - set(before))])
