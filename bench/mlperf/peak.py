"""--find-peak: the highest Server target QPS whose p99 latency meets MLPerf's bound, in a
bounded number of LoadGen runs. Pure logic over a `measure(qps) -> Round` callable, so the
search is tested on a scripted latency source without TensorFlow or LoadGen.

The search: while no round has met the bound, lower the target by the ratio bound / p99,
clamped to [0.5, 0.9] (latency in a queue falls faster than the load near saturation, so the
ratio is a safe first step, and the clamp keeps one noisy round from collapsing the target).
Once one round passes and one fails, bisect between them (geometrically) until they are within
`precision` of each other. A first round that passes is raised 1.5x, up to `ceiling` (the
Offline samples/s: a server cannot sustain more than the throughput with everything queued).
It stops at once when even the fastest sample exceeded the bound: no target QPS can meet it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

STEP_DOWN = (0.5, 0.9)
STEP_UP = 1.5


@dataclass(frozen=True)
class Round:
    target_qps: float
    p99_s: float | None
    min_latency_s: float | None = None
    result: str | None = None                 # LoadGen's VALID / INVALID (a short run is INVALID by early stopping)

    def meets(self, bound_s: float) -> bool:
        return self.p99_s is not None and self.p99_s <= bound_s


@dataclass(frozen=True)
class Peak:
    rounds: tuple[Round, ...]
    best: Round | None                        # the highest target QPS that met the bound
    reason: str                               # why the search stopped


def next_target(rounds: Sequence[Round], bound_s: float, ceiling: float | None = None,
                precision: float = 0.1) -> tuple[float | None, str]:
    """(the next target QPS, why) after `rounds`; None when the search is over."""
    last = rounds[-1]
    if last.p99_s is None:
        return None, f"the run at {last.target_qps:g} QPS reported no p99 latency (did it fail?)"
    if last.min_latency_s is not None and last.min_latency_s > bound_s:
        return None, (f"even the fastest sample took {last.min_latency_s:.1f} s, above the {bound_s:g} s bound: "
                      "no target QPS can meet it; the system under test must get faster")
    passing = [r.target_qps for r in rounds if r.meets(bound_s)]
    failing = [r.target_qps for r in rounds if not r.meets(bound_s)]
    if not passing:
        lowest = min(rounds, key=lambda r: r.target_qps)
        factor = min(max(bound_s / lowest.p99_s, STEP_DOWN[0]), STEP_DOWN[1])
        return lowest.target_qps * factor, (f"p99 {lowest.p99_s:.2f} s > {bound_s:g} s at {lowest.target_qps:g} QPS: "
                                            f"lower by {factor:.2f}")
    low = max(passing)
    above = [q for q in failing if q > low]
    if not above:
        if ceiling is not None and low * (1 + precision) >= ceiling:
            return None, f"meets the bound at {low:g} QPS, within {precision:.0%} of the ceiling {ceiling:g}"
        raised = low * STEP_UP if ceiling is None else min(low * STEP_UP, ceiling)
        return raised, f"meets the bound at {low:g} QPS: try higher"
    high = min(above)
    if high <= low * (1 + precision):
        return None, f"peak between {low:g} (meets) and {high:g} QPS (misses), within {precision:.0%}"
    return math.sqrt(low * high), f"bisect between {low:g} (meets) and {high:g} QPS (misses)"


def find_peak(measure: Callable[[float], Round], start_qps: float, bound_s: float, max_rounds: int,
              ceiling: float | None = None, precision: float = 0.1,
              report: Callable[[str], None] = print) -> Peak:
    """Run `measure` at up to `max_rounds` target QPS values, starting at `start_qps`."""
    if start_qps <= 0 or max_rounds < 1:
        raise ValueError(f"find-peak needs a positive start QPS ({start_qps}) and at least one round ({max_rounds})")
    rounds: list[Round] = []
    qps: float | None = start_qps
    reason = f"{max_rounds} round(s) run"
    while qps is not None and len(rounds) < max_rounds:
        report(f"find-peak round {len(rounds) + 1}/{max_rounds}: target {qps:.4g} QPS")
        rounds.append(measure(qps))
        last = rounds[-1]
        p99 = "no p99" if last.p99_s is None else f"p99 {last.p99_s:.2f} s"
        report(f"find-peak round {len(rounds)}/{max_rounds}: {qps:.4g} QPS -> {p99} "
               f"({'meets' if last.meets(bound_s) else 'misses'} {bound_s:g} s; LoadGen {last.result})")
        qps, why = next_target(rounds, bound_s, ceiling, precision)
        reason = why if qps is None else f"{max_rounds} round(s) run; next would be: {why}"
    passing = [r for r in rounds if r.meets(bound_s)]
    return Peak(tuple(rounds), max(passing, key=lambda r: r.target_qps) if passing else None, reason)
