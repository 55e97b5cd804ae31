"""Whole-file writes that never leave a half-written file behind, with the permissions any
other file written by the process would get."""
from __future__ import annotations

import os
import stat
import tempfile


def current_umask() -> int:
    """The process umask, read without changing it where Linux allows: os.umask can only be read
    by setting it, and a file another thread creates in that instant would get the wrong mode."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    umask = os.umask(0o077)        # the strictest value for the instant it is set
    os.umask(umask)
    return umask


def atomic_write_text(path: str, text: str) -> None:
    """Write `text` to a temp file beside `path`, fsync it, then rename it over `path`.

    The file keeps the mode of the one it replaces; a new one gets 0666 minus the umask (mkstemp
    would leave 0600, unreadable to the group that shares a run directory)."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    mode = stat.S_IMODE(os.stat(path).st_mode) if os.path.exists(path) else 0o666 & ~current_umask()
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
