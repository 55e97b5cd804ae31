"""Prometheus metrics of one server (its own registry: no process-wide state)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120)


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("gptj_requests", "completion requests by outcome", ["status"], registry=r)
        self.prompt_tokens = Counter("gptj_prompt_tokens", "prompt tokens of accepted requests", registry=r)
        self.generated_tokens = Counter("gptj_generated_tokens", "tokens generated", registry=r)
        self.queue_depth = Gauge("gptj_queue_depth", "requests waiting for a cache slot", registry=r)
        self.busy_slots = Gauge("gptj_busy_slots", "cache slots decoding a request", registry=r)
        self.occupancy = Histogram("gptj_batch_occupancy", "fraction of slots busy per decode step",
                                   buckets=(0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0), registry=r)
        self.latency = Histogram("gptj_request_latency_seconds", "arrival to last token", buckets=LATENCY_BUCKETS,
                                 registry=r)
        self.ttft = Histogram("gptj_time_to_first_token_seconds", "arrival to first token",
                              buckets=LATENCY_BUCKETS, registry=r)

    # hooks the scheduler calls
    def step(self, busy: int, slots: int) -> None:
        self.busy_slots.set(busy)
        self.occupancy.observe(busy / slots)

    def tokens(self, count: int) -> None:
        self.generated_tokens.inc(count)

    def queue(self, depth: int) -> None:
        self.queue_depth.set(depth)

    def first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def text(self) -> bytes:
        return generate_latest(self.registry)
