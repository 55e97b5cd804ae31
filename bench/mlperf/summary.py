"""LoadGen's mlperf_log_summary.txt read into figures, and the record each run leaves beside it.

A run's output directory keeps LoadGen's logs plus `command.txt` (the command line that made
them) and `result.json` (the figures below, the settings the harness chose, the wall time), so
a directory read months later says what ran and what it gave.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import sys
from dataclasses import asdict, dataclass, field

from config.files import atomic_write_text

SUMMARY = "mlperf_log_summary.txt"
PERCENTILES = ("50.00", "90.00", "95.00", "97.00", "99.00", "99.90")


@dataclass(frozen=True)
class Summary:
    scenario: str | None
    mode: str | None
    result: str | None                     # "VALID" | "INVALID"
    samples_per_s: float | None            # Offline: samples/s; Server: completed samples/s
    scheduled_per_s: float | None          # Server: the scheduled rate (a VALID run's reported metric)
    tokens_per_s: float | None             # LoadGen's "(inferred)" tokens/s: from the responses' token counts
    target_qps: float | None
    min_latency_s: float | None
    mean_latency_s: float | None
    max_latency_s: float | None
    percentiles_s: dict[str, float] = field(default_factory=dict)       # "99.00" -> seconds
    unmet: tuple[str, ...] = ()            # the "... satisfied : NO" constraints
    early_stopping: tuple[str, ...] = ()   # LoadGen's early-stopping lines (why a short run is INVALID)

    @property
    def p99_s(self) -> float | None:
        return self.percentiles_s.get("99.00")


def _number(text: str, label: str) -> float | None:
    found = re.search(rf"^\s*{re.escape(label)}\s*:\s*([0-9.eE+-]+)\s*$", text, re.MULTILINE)
    return float(found.group(1)) if found else None


def _word(text: str, label: str) -> str | None:
    found = re.search(rf"^\s*{re.escape(label)}\s*:\s*(\S+)", text, re.MULTILINE)
    return found.group(1) if found else None


def _seconds(text: str, label: str) -> float | None:
    nanoseconds = _number(text, label)
    return None if nanoseconds is None else nanoseconds / 1e9


def _early_stopping(text: str) -> tuple[str, ...]:
    """The bullet points under "Early Stopping Result:" (a bullet may wrap over several lines)."""
    _, found, rest = text.partition("Early Stopping Result:\n")
    block = " ".join(rest.split("\n\n", 1)[0].split()) if found else ""
    return tuple(item.strip() for item in block.split("* ") if item.strip())


def read_summary(text: str) -> Summary:
    """The figures of a summary's text (absent ones None)."""
    offline = _number(text, "Samples per second")
    completed = _number(text, "Completed samples per second")
    tokens = _number(text, "Tokens per second (inferred)") or _number(text, "Completed tokens per second (inferred)")
    unmet = tuple(m.group(1).strip() for m in re.finditer(r"^\s*(.+?)\s*satisfied\s*:\s*NO\s*$", text,
                                                          re.MULTILINE | re.IGNORECASE))
    return Summary(scenario=_word(text, "Scenario"), mode=_word(text, "Mode"), result=_word(text, "Result is"),
                   samples_per_s=offline if offline is not None else completed,
                   scheduled_per_s=_number(text, "Scheduled samples per second"), tokens_per_s=tokens,
                   target_qps=_number(text, "target_qps"),
                   min_latency_s=_seconds(text, "Min latency (ns)"),
                   mean_latency_s=_seconds(text, "Mean latency (ns)"),
                   max_latency_s=_seconds(text, "Max latency (ns)"),
                   percentiles_s={p: s for p in PERCENTILES
                                  if (s := _seconds(text, f"{p} percentile latency (ns)")) is not None},
                   unmet=unmet, early_stopping=_early_stopping(text))


def load_summary(directory: str) -> Summary:
    path = os.path.join(directory, SUMMARY)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} does not exist: no LoadGen run finished in {directory}")
    with open(path, encoding="utf-8") as f:
        return read_summary(f.read())


def describe(summary: Summary) -> list[str]:
    """The summary's figures in a few lines (the harness prints them after each run)."""
    rate = "completed samples/s" if summary.scenario == "Server" else "samples/s"
    head = f"{summary.scenario} {summary.mode}: {summary.result}"
    if summary.result == "INVALID":
        reasons = [f"{name} not satisfied" for name in summary.unmet]
        reasons += [" ".join(summary.early_stopping[1:])] if len(summary.early_stopping) > 1 else []
        head += f" ({'; '.join(reasons)})" if reasons else ""
    figures = [f"{rate} {summary.samples_per_s:.4g}" if summary.samples_per_s is not None else None,
               f"tokens/s {summary.tokens_per_s:.4g}" if summary.tokens_per_s is not None else None,
               f"target QPS {summary.target_qps:g}" if summary.target_qps is not None else None]
    latencies = ", ".join(f"p{float(p):g} {s:.2f} s" for p, s in summary.percentiles_s.items())
    lines = [head, "  " + ", ".join(f for f in figures if f)]
    if summary.min_latency_s is not None:
        lines.append(f"  latency: min {summary.min_latency_s:.2f} s, mean {summary.mean_latency_s:.2f} s, {latencies}")
    return lines


def command_line(argv: list[str] | None) -> str:
    """The command as a user would type it again."""
    args = sys.argv[1:] if argv is None else argv
    return shlex.join(["python", "-m", "bench.mlperf.run", *args])


def write_record(directory: str, argv: list[str] | None, summary: Summary | None, **details) -> None:
    """command.txt and result.json in a run's directory (written after LoadGen's own logs)."""
    atomic_write_text(os.path.join(directory, "command.txt"), command_line(argv) + "\n")
    figures = {**asdict(summary), "p99_s": summary.p99_s} if summary else None
    record = {"command": command_line(argv), **details, "summary": figures}
    atomic_write_text(os.path.join(directory, "result.json"), json.dumps(record, indent=1) + "\n")
