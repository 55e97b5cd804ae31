"""Console output for long work: one timestamped line per event, one progress line per log step."""
from __future__ import annotations

import sys
import time


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stdout, flush=True)


def format_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


class ProgressLine:
    """`step 120/1000 (12%) | loss 5.123 | 12,345 tok/s | lr 1.0e-04 | ETA 3m20s` per log step."""

    def __init__(self, start_step: int, max_steps: int):
        self.start_step, self.max_steps = start_step, max_steps
        self.started = time.time()

    def update(self, step: int, logs: dict) -> None:
        done = step - self.start_step
        rate = done / max(time.time() - self.started, 1e-9)
        eta = (self.max_steps - step) / rate if rate > 0 else float("inf")
        parts = [f"step {step}/{self.max_steps} ({100 * step / self.max_steps:.0f}%)",
                 f"loss {logs['loss']:.4f}", f"{logs['tokens_per_sec']:,.0f} tok/s",
                 f"lr {logs['learning_rate']:.2e}", f"grad norm {logs['grad_norm']:.3f}"]
        if logs.get("mfu") is not None:
            parts.append(f"MFU {100 * logs['mfu']:.1f}%")
        if logs.get("loss_scale", 1.0) != 1.0:
            parts.append(f"loss scale {logs['loss_scale']:g}")
        parts.append(f"ETA {format_duration(eta) if eta != float('inf') else '?'}")
        log(" | ".join(parts))

    def close(self) -> None:
        log(f"trained {self.max_steps - self.start_step} steps in {format_duration(time.time() - self.started)}")
