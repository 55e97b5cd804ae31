"""LoadGen systems under test: the generator in this process, or the HTTP server.

Both answer a query sample with its generated token ids (int32 bytes) and never leave one
unanswered: a failed sample is answered with no tokens and its error kept in `errors`, so
LoadGen finishes and the harness reports the failure.
"""
from __future__ import annotations

import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import mlperf_loadgen as lg
import numpy as np

from generation.config import GenerationConfig


def respond(sample_id: int, token_ids: Sequence[int]) -> None:
    data = np.asarray(token_ids, np.int32)
    # LoadGen copies the bytes (accuracy mode) before QuerySamplesComplete returns; `data` lives until then.
    lg.QuerySamplesComplete([lg.QuerySampleResponse(sample_id, data.ctypes.data, data.nbytes, len(data))])


class GeneratorSUT:
    """generation.Generator in this process. One worker thread owns the model: it takes what
    is queued, up to batch_size samples of similar prompt length, and generates them together
    (Offline issues every sample at once; Server one at a time as they arrive)."""

    def __init__(self, generator, config: GenerationConfig, prompts: Sequence[Sequence[int]], batch_size: int = 1):
        if batch_size < 1:
            raise ValueError(f"--batch-size {batch_size} must be at least 1")
        self.generator, self.config, self.prompts, self.batch_size = generator, config, prompts, batch_size
        self.errors: list[str] = []
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._work, name="sut", daemon=True)
        self._thread.start()
        self.handle = lg.ConstructSUT(self.issue_queries, self.flush_queries)

    def issue_queries(self, samples) -> None:
        for sample in samples:
            self._queue.put((sample.id, sample.index))

    def flush_queries(self) -> None:
        pass

    def _work(self) -> None:
        pending: list[tuple[int, int]] = []
        while True:
            if not pending:
                item = self._queue.get()
                if item is None:
                    return
                pending.append(item)
            while True:                                  # everything queued by now
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    return
                pending.append(item)
            pending.sort(key=lambda item: len(self.prompts[item[1]]))
            batch, pending = pending[:self.batch_size], pending[self.batch_size:]
            try:
                results = self.generator.generate([self.prompts[index] for _, index in batch], self.config)
                answers = [r.token_ids for r in results]
            except Exception as err:                     # answer every sample; the harness reports it
                self.errors.append(f"samples {[index for _, index in batch]}: {err}")
                answers = [[] for _ in batch]
            for (sample_id, _), ids in zip(batch, answers):
                respond(sample_id, ids)

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(60)
        lg.DestroySUT(self.handle)


class HttpSUT:
    """POST /v1/completions of a serving.server (token-id prompts, beam search as MLPerf decodes),
    `concurrency` requests in flight at most."""

    def __init__(self, url: str, config: GenerationConfig, prompts: Sequence[Sequence[int]], concurrency: int = 8,
                 timeout: float = 600.0):
        import requests
        self.session = requests.Session()
        self.url, self.prompts, self.timeout = url.rstrip("/") + "/v1/completions", prompts, timeout
        self.body = {"max_tokens": config.max_new_tokens, "min_tokens": config.min_new_tokens,
                     "num_beams": config.num_beams, "temperature": 0}
        self.errors: list[str] = []
        self._pool = ThreadPoolExecutor(concurrency, thread_name_prefix="http-sut")
        self.handle = lg.ConstructSUT(self.issue_queries, self.flush_queries)

    def issue_queries(self, samples) -> None:
        for sample in samples:
            self._pool.submit(self._ask, sample.id, sample.index)

    def flush_queries(self) -> None:
        pass

    def _ask(self, sample_id: int, index: int) -> None:
        ids: list[int] = []
        try:
            reply = self.session.post(self.url, json={**self.body, "prompt": list(self.prompts[index])},
                                      timeout=self.timeout)
            if reply.status_code != 200:
                raise RuntimeError(f"HTTP {reply.status_code}: {reply.text[:300]}")
            ids = reply.json()["choices"][0]["token_ids"]
        except Exception as err:                         # answer every sample; the harness reports it
            self.errors.append(f"sample {index}: {err}")
        respond(sample_id, ids)

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        lg.DestroySUT(self.handle)
