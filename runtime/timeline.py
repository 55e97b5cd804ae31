"""Where a weight-streaming step's time goes: wall time per category, per step.

The main thread's spans are exclusive (one category at a time), so they and `other` (the rest
of the step: Python, the data pipeline's hand-over) add up to the step's wall time. Work done
by background threads (disk reads ahead, gradient writes) runs beside them: it is recorded in
its own `background ...` categories, outside that sum, and the main thread's `wait` is the part
of it that was not hidden behind compute.

Spans measure host wall time: on CPU a compiled call returns when its kernels have run; on an
accelerator, whose kernels run asynchronously, the time shows where the host waits for results.
"""
from __future__ import annotations

import contextlib
import threading
import time
from collections import defaultdict

# main-thread categories, in the order a step runs them
FORWARD = "forward"
HEAD = "last block + head"
BACKWARD = "recompute + backward"
COPY = "copies host<->device"
HOST_UPDATE = "host optimizer"
DISK = "disk I/O"
WAIT = "waiting (I/O not hidden)"
OTHER = "other"
MAIN_CATEGORIES = (FORWARD, HEAD, BACKWARD, COPY, HOST_UPDATE, DISK, WAIT, OTHER)
BACKGROUND_READ = "background: host reads"
BACKGROUND_WRITE = "background: gradient writes"
BACKGROUND_UPDATE = "background: optimizer threads"
BACKGROUND_CATEGORIES = (BACKGROUND_READ, BACKGROUND_WRITE, BACKGROUND_UPDATE)


class Timeline:
    """Per-step seconds per category. `span(category)` times a block of code; spans nest, and
    a nested span's time counts for it alone (the outer one pauses), per thread."""

    def __init__(self):
        self.steps: list[dict[str, float]] = []
        self._current: dict[str, float] = defaultdict(float)
        self._started: float | None = None
        self._lock = threading.Lock()
        self._local = threading.local()          # per thread: [[category, resumed at], ...]

    def _add(self, category: str, seconds: float) -> None:
        with self._lock:
            self._current[category] += seconds

    @contextlib.contextmanager
    def span(self, category: str):
        stack = self._local.__dict__.setdefault("stack", [])
        now = time.perf_counter()
        if stack:
            self._add(stack[-1][0], now - stack[-1][1])
        stack.append([category, now])
        try:
            yield
        finally:
            now = time.perf_counter()
            self._add(category, now - stack.pop()[1])
            if stack:
                stack[-1][1] = now

    def start_step(self) -> None:
        self._started = time.perf_counter()

    def end_step(self) -> None:
        """Close the step begun by start_step: `total` is its wall time, `other` what no span covered."""
        total = time.perf_counter() - self._started
        with self._lock:
            step = dict(self._current)
            self._current = defaultdict(float)
        step[OTHER] = max(0.0, total - sum(step.get(c, 0.0) for c in MAIN_CATEGORIES if c != OTHER))
        step["total"] = total
        self.steps.append(step)

    def summed(self, first: int = 0) -> dict[str, float]:
        """Seconds per category summed over steps[first:]."""
        total: dict[str, float] = defaultdict(float)
        for step in self.steps[first:]:
            for category, seconds in step.items():
                total[category] += seconds
        return dict(total)


def format_timeline(timeline: Timeline, first: int = 0) -> str:
    """A table: one column per step from `first`, then their sum and its share of the wall time."""
    steps = timeline.steps[first:]
    summed = timeline.summed(first)
    wall = summed.get("total", 0.0) or 1.0
    header = f"{'':<30}" + "".join(f"{f'step {first + i + 1}':>9}" for i in range(len(steps))) + \
        f"{'sum':>9}{'share':>8}"
    lines = [header]
    for category in MAIN_CATEGORIES + ("total",) + BACKGROUND_CATEGORIES:
        if category not in summed:
            continue
        cells = "".join(f"{step.get(category, 0.0):9.3f}" for step in steps)
        lines.append(f"{category:<30}{cells}{summed[category]:9.3f}{summed[category] / wall:8.0%}")
    return "\n".join(lines)
