"""The load generator of bench/serve.py: greedy requests of mixed lengths, sent with c in flight.

It runs in a process of its own (bench.serve starts it with `spawn`), as real clients do:
clients in the server's process would share its interpreter lock with the scheduler thread
and slow every decode call by the time they hold it. Imports no TensorFlow.
"""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import requests


def workload(count: int, vocab: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    jobs = []
    for i in range(count):
        prompt = rng.integers(1, vocab, size=int(rng.integers(8, 200))).tolist()
        max_tokens = int(rng.choice([8, 16, 24, 32, 128], p=[0.3, 0.25, 0.2, 0.1, 0.15]))
        jobs.append({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True})
    return jobs


def run_level(url: str, jobs: list[dict], concurrency: int) -> dict:
    """Send `jobs` with `concurrency` in flight -> figures and the latencies."""
    latencies, tokens = [], []
    lock = threading.Lock()
    pending = iter(jobs)

    def client(_: int) -> None:
        while True:
            with lock:
                body = next(pending, None)
            if body is None:
                return
            start = time.perf_counter()
            reply = requests.post(url + "/v1/completions", json=body, timeout=600)
            reply.raise_for_status()
            with lock:
                latencies.append(time.perf_counter() - start)
                tokens.append(reply.json()["usage"]["completion_tokens"])

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(client, range(concurrency)))
    seconds = time.perf_counter() - start
    return {"requests/s": len(jobs) / seconds, "tokens/s": sum(tokens) / seconds, "latencies": latencies}
