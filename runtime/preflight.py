"""The memory preflight: before a command builds its model, compare the peak memory it will
need (runtime/peak_memory.py) with the memory this process may use, and stop with one line
when it does not fit, instead of being killed by the kernel's OOM killer minutes later with
no message at all. Free of TensorFlow: run.py checks before TensorFlow is even imported.

What this process may use is the smaller of
  - the machine's MemAvailable (/proc/meminfo: free memory plus the page cache the kernel can
    reclaim), and
  - the room its memory cgroup leaves: limit minus usage, for its own cgroup and every parent
    up to the hierarchy's root (a parent's limit binds its children too); cgroup v2
    `memory.max` / `memory.current`, v1 `memory.limit_in_bytes` / `memory.usage_in_bytes`.
    Usage counts the cgroup's reclaimable page cache (`inactive_file` in `memory.stat`), which
    the kernel drops before it kills anything, so that is subtracted from it, as the kubelet's
    working set does;
plus what this process holds already (VmRSS): the estimate counts the whole process.

Every command that builds a model calls `check(estimate, skip)` right after reading its
arguments and params; `--skip-memory-check` (the `skip` flag) runs it anyway.
"""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from typing import Sequence

from runtime.peak_memory import Estimate

GiB = float(1 << 30)
# cgroup v1 writes "no limit" as the largest page-aligned signed 64-bit value; anything this large is none
NO_LIMIT = 1 << 60


class NotEnoughMemoryError(ValueError):
    """The command's estimated peak exceeds the memory available to it (one line, with the fix)."""


@dataclass(frozen=True)
class Available:
    bytes: float
    source: str          # where it was read, for the message: "MemAvailable", "memory cgroup /x: limit - usage"


def add_skip_flag(parser: argparse.ArgumentParser) -> None:
    """--skip-memory-check: the flag every command that builds a model takes."""
    parser.add_argument("--skip-memory-check", action="store_true",
                        help="run even when the estimated peak memory exceeds what this machine (or cgroup) "
                             "has available (docs/runtime.md, memory preflight)")


# ---- reading the limits -------------------------------------------------------------------

def _read(path: str) -> str | None:
    try:
        with open(path, encoding="ascii") as f:
            return f.read()
    except OSError:
        return None


def _keyed(text: str | None, key: str, scale: int = 1) -> int | None:
    """The number after `key` in a "key value [kB]" file (/proc/meminfo, memory.stat, status)."""
    for line in (text or "").splitlines():
        parts = line.replace(":", " ").split()
        if len(parts) >= 2 and parts[0] == key:
            return int(parts[1]) * scale
    return None


def meminfo_available(root: str = "/") -> int | None:
    """MemAvailable in bytes (None: no /proc/meminfo, or a kernel before 3.14)."""
    return _keyed(_read(os.path.join(root, "proc/meminfo")), "MemAvailable", 1024)


def own_rss(root: str = "/") -> int:
    """This process's resident set now (the estimate counts the whole process, this included)."""
    return _keyed(_read(os.path.join(root, "proc/self/status")), "VmRSS", 1024) or 0


# The files of each cgroup version: limit, usage, and the reclaimable page cache's key in memory.stat.
CGROUP_FILES = {"v1": ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file"),
                "v2": ("memory.max", "memory.current", "inactive_file")}


def _memory_cgroup(root: str) -> tuple[str, str, str] | None:
    """(directory of this process's memory cgroup, its hierarchy's mount point, "v1" | "v2"):
    cgroup v1's memory controller, else the v2 unified hierarchy; None when there is neither."""
    lines = (_read(os.path.join(root, "proc/self/cgroup")) or "").splitlines()
    entries = [line.split(":", 2) for line in lines if line.count(":") >= 2]
    paths = {"v1": [path for _, controllers, path in entries if "memory" in controllers.split(",")],
             "v2": [path for number, controllers, path in entries if number == "0" and controllers == ""]}
    mounts = (_read(os.path.join(root, "proc/self/mountinfo")) or "").splitlines()
    for version in ("v1", "v2"):
        for line in mounts if paths[version] else ():
            fields, _, tail = (part.split() for part in line.partition(" - "))
            if len(fields) < 5 or len(tail) < 3:
                continue
            kind, options = tail[0], tail[2].split(",")
            if (kind == "cgroup" and "memory" in options) if version == "v1" else kind == "cgroup2":
                mount_root, mount_point = fields[3], fields[4]
                path = paths[version][0]
                # Without a cgroup namespace a container's mount shows only its own subtree.
                if mount_root != "/" and (path == mount_root or path.startswith(mount_root + "/")):
                    path = path[len(mount_root):]
                mount = os.path.join(root, mount_point.lstrip("/"))
                return os.path.join(mount, path.lstrip("/")), mount, version
    return None


def _cgroup_room(directory: str, version: str) -> int | None:
    """limit - (usage - inactive page cache) of one cgroup directory; None without a limit."""
    limit_file, usage_file, cache_key = CGROUP_FILES[version]
    limit = (_read(os.path.join(directory, limit_file)) or "max").strip()
    if not limit.isdigit() or int(limit) >= NO_LIMIT:          # "max" (v2), v1's huge "no limit", unreadable
        return None
    usage = int((_read(os.path.join(directory, usage_file)) or "0").strip() or 0)
    cache = _keyed(_read(os.path.join(directory, "memory.stat")), cache_key) or 0
    return int(limit) - max(usage - cache, 0)


def cgroup_room(root: str = "/") -> tuple[int, str] | None:
    """(bytes, cgroup path) of the tightest limit among this process's memory cgroup and its
    parents, None when no cgroup sets one."""
    found = _memory_cgroup(root)
    if found is None:
        return None
    directory, mount, version = found
    directory, mount = os.path.normpath(directory), os.path.normpath(mount)
    tightest = None
    while directory.startswith(mount):
        room = _cgroup_room(directory, version)
        if room is not None and (tightest is None or room < tightest[0]):
            relative = os.path.relpath(directory, mount)
            tightest = (room, "/" if relative == "." else "/" + relative)
        if directory == mount:
            break
        directory = os.path.dirname(directory)
    return tightest


def available_memory(root: str = "/") -> Available:
    """What this process may use: min(MemAvailable, cgroup room) + its own resident set. `root`
    is where /proc and /sys are read from (tests pass a directory of fake files)."""
    candidates = []
    meminfo = meminfo_available(root)
    if meminfo is not None:
        candidates.append((meminfo, "MemAvailable"))
    room = cgroup_room(root)
    if room is not None:
        candidates.append((max(room[0], 0), f"memory cgroup {room[1]}: limit - usage"))
    if not candidates:
        return Available(float("inf"), "no /proc/meminfo and no cgroup limit")
    size, source = min(candidates)
    return Available(float(size + own_rss(root)), source)


def gpu_visible(root: str = "/", environ=os.environ) -> bool:
    """An NVIDIA GPU this process may use (the driver lists one and CUDA_VISIBLE_DEVICES does
    not hide it): then the weights live in device memory, which this check does not read."""
    if environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    try:
        return bool(os.listdir(os.path.join(root, "proc/driver/nvidia/gpus")))
    except OSError:
        return False


# ---- the check ----------------------------------------------------------------------------

def gib(size: float) -> str:
    return f"{size / GiB:.1f} GiB" if size >= 0.95 * GiB else f"{size / (1 << 20):.0f} MiB"


def refusal(estimate: Estimate, available: Available) -> str:
    """The one line a command stops with: what it needs (the main terms), what is available, the
    fix (per flag, the first of the estimate's fixes that fits; if none does, the smallest)."""
    terms = sorted(estimate.terms, key=lambda t: -t[1])
    shown = ", ".join(f"{name} {gib(size)}" for name, size in terms[:4])
    fitting: dict[str, str] = {}
    for change, size in estimate.fixes:
        if size <= available.bytes:
            fitting.setdefault(change.split()[0], f"{change} (~{gib(size)})")
    if fitting:
        advice = "it fits with " + " or with ".join(list(fitting.values())[:3]) + "; "
    elif estimate.fixes:
        change, size = min(estimate.fixes, key=lambda f: f[1])
        advice = f"even with {change} it needs ~{gib(size)}; "
    else:
        advice = ""
    if estimate.plan:
        advice += f"size a run with {estimate.plan}; "
    return (f"{estimate.command} needs ~{gib(estimate.total)} of memory at its peak ({shown}) but "
            f"{gib(available.bytes)} is available ({available.source}); {advice}"
            "--skip-memory-check runs it anyway")


def check(estimate: Estimate, skip: bool, available: Available | None = None) -> None:
    """Raise NotEnoughMemoryError (a ValueError: each CLI prints it as its one `error:` line and
    exits 2) when `estimate` exceeds the available memory, unless `skip`. With a GPU visible the
    model lives in device memory, which is not read here: nothing is checked."""
    if skip or (available is None and gpu_visible()):
        return
    available = available or available_memory()
    if estimate.total > available.bytes:
        raise NotEnoughMemoryError(refusal(estimate, available))


def describe(estimate: Estimate) -> Sequence[str]:
    """The estimate's terms as lines (for docs and logs)."""
    return [f"{name}: {gib(size)}" for name, size in estimate.terms] + [f"total: {gib(estimate.total)}"]
