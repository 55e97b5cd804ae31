"""The batching scheduler: a fixed set of cache slots, one compiled step over all of them.

One thread owns the model. Between steps it drops cancelled and expired jobs, admits queued
jobs into free slots (prefill, then the job's rows join the next step), runs one step for
every slot, and hands each row's new token to its job's sink; a row whose job finished frees
its slot at once. So a short request never waits for a long one to finish.

    continuous: admit whenever slots are free.
    static:     admit only when every slot is free (whole requests batched together, waiting up
                to max_wait for the batch to fill): dynamic batching, the baseline.

Beam search and bad words run as whole requests through the Generator (beams need a batch of
their own shape; bad-word tables are trace-time constants), between two steps of the slot
batch, which pauses for that long.
"""
from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import tensorflow as tf

from generation.batch import left_pad
from generation.config import GenerationConfig
from generation.generator import Generator
from generation.results import Generation
from model import GPTJModel
from serving.slots import SlotDecoder, row_settings, supports

MODES = ("continuous", "static")
IDLE = GenerationConfig()             # settings of a free row (its tokens are never read)
# sink(kind, sequence, payload): "tokens" (ids so far), "finish" (a Generation), "error" (a message)
Sink = Callable[[str, int, object], None]


class QueueFull(RuntimeError):
    """The queue holds max_queue jobs already."""


class Draining(RuntimeError):
    """The scheduler is shutting down and takes no new jobs."""


@dataclass
class Job:
    prompt_ids: list[int]
    config: GenerationConfig
    seed: int
    sink: Sink
    stop_checker: Callable[[list[int]], str | None] | None = None   # new ids -> stop string found
    deadline: float | None = None            # time.monotonic() after which the job times out
    arrived: float = field(default_factory=time.monotonic)
    cancelled: bool = False                  # set by the client side (a disconnect)
    tokens: list[list[int]] = field(default_factory=list)
    open_rows: int = 0

    @property
    def rows_needed(self) -> int:
        return self.config.num_return_sequences if supports(self.config) else 0


@dataclass
class Row:
    job: Job
    sequence: int


class Scheduler:
    def __init__(self, model: GPTJModel, slots: int, cache_length: int, mode: str = "continuous",
                 max_queue: int = 64, max_wait: float = 0.02, compile_mode: str = "xla",
                 length_multiple: int = 32, metrics=None):
        if mode not in MODES:
            raise ValueError(f"batching mode {mode!r} is not one of {', '.join(MODES)}")
        self.decoder = SlotDecoder(model, slots, cache_length, compile_mode)
        self.generator = Generator(model, compile_mode, length_multiple)
        self.slots, self.cache_length, self.mode = slots, cache_length, mode
        self.max_queue, self.max_wait, self.length_multiple = max_queue, max_wait, length_multiple
        self.metrics = metrics
        self.queue: collections.deque[Job] = collections.deque()
        self.rows: list[Row | None] = [None] * slots
        self.condition = threading.Condition()
        self.draining = False
        self._stopped = False
        self._settings = None
        self._state = self.decoder.empty_state()
        self._thread = threading.Thread(target=self._run, name="scheduler", daemon=True)

    # ---- client side (any thread) ----------------------------------------------------------

    def start(self) -> "Scheduler":
        self._thread.start()
        return self

    def submit(self, job: Job) -> None:
        with self.condition:
            if self.draining:
                raise Draining("the server is shutting down and takes no new requests")
            if len(self.queue) >= self.max_queue:
                raise QueueFull(f"the queue is full (max_queue={self.max_queue}); retry later")
            self.queue.append(job)
            self._observe_queue()
            self.condition.notify()

    def cancel(self, job: Job) -> None:
        with self.condition:
            job.cancelled = True
            self.condition.notify()

    def stop(self, timeout: float | None = None) -> None:
        """Finish queued and running jobs, then end the thread."""
        with self.condition:
            self.draining = True
            self._stopped = True
            self.condition.notify()
        self._thread.join(timeout)

    @property
    def busy_rows(self) -> int:
        return sum(r is not None for r in self.rows)

    @property
    def queue_depth(self) -> int:
        return len(self.queue)

    # ---- the scheduler thread ----------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self.condition:
                while not self.queue and not self.busy_rows and not self._stopped:
                    self.condition.wait(0.5)
                if self._stopped and not self.queue and not self.busy_rows:
                    return
            self._expire()
            admitted = self._admit()
            if self.busy_rows:
                self._step()
            elif not admitted:
                time.sleep(0.001)     # static mode waiting for its batch to fill

    def _expire(self) -> None:
        now = time.monotonic()
        with self.condition:
            queued = list(self.queue)
        for job in queued:
            if job.cancelled or (job.deadline is not None and now > job.deadline):
                with self.condition:
                    self.queue.remove(job)
                    self._observe_queue()
                self._end_job(job, "cancelled" if job.cancelled else "timeout")
        for index, row in enumerate(self.rows):
            if row is None:
                continue
            job = row.job
            if job.cancelled or (job.deadline is not None and now > job.deadline):
                self._free_job(job)
                self._end_job(job, "cancelled" if job.cancelled else "timeout")

    def _admit(self) -> bool:
        free = [i for i, r in enumerate(self.rows) if r is None]
        if self.mode == "static":
            if len(free) < self.slots:
                return False
            with self.condition:
                waiting = sum(max(j.rows_needed, 1) for j in self.queue)
                oldest = self.queue[0].arrived if self.queue else None
            if oldest is None or (waiting < self.slots and time.monotonic() - oldest < self.max_wait
                                  and not self._stopped):
                return False
        admitted = False
        while True:
            with self.condition:
                if not self.queue or self.queue[0].rows_needed > len(free):
                    break
                job = self.queue.popleft()
                self._observe_queue()
            admitted = True
            if job.rows_needed == 0:
                self._run_whole(job)
                continue
            self._join(job, free[:job.rows_needed])
            free = free[job.rows_needed:]
        return admitted

    def _join(self, job: Job, rows: list[int]) -> None:
        """Prefill the job's rows (one per sequence) into free slots; each gets its first token."""
        config = job.config
        batch = left_pad([job.prompt_ids], config.pad_token_id, self.length_multiple)
        job.tokens = [[] for _ in rows]
        job.open_rows = len(rows)
        for sequence, row in enumerate(rows):
            self._state, first = self.decoder.admit(
                self._state, tf.constant(row), tf.constant(batch.tokens), tf.constant(batch.first_slot),
                row_settings([config], [job.seed], [sequence]))
            self.rows[row] = Row(job, sequence)
            self._settings = None
            if self.metrics is not None:
                self.metrics.first_token(time.monotonic() - job.arrived)
            self._take(row, int(first[0]))

    def _step(self) -> None:
        if self._settings is None:
            configs = [r.job.config if r else IDLE for r in self.rows]
            self._settings = row_settings(configs, [r.job.seed if r else 0 for r in self.rows],
                                          [r.sequence if r else 0 for r in self.rows])
        active = self.busy_rows
        self._state, chosen = self.decoder.step(self._state, self._settings)
        if self.metrics is not None:
            self.metrics.step(active, self.slots)
        for row, token in enumerate(np.asarray(chosen)):
            if self.rows[row] is not None:
                self._take(row, int(token))

    def _take(self, row: int, token: int) -> None:
        """Row `row` chose `token`: record it, tell the sink, end the sequence if it finished."""
        slot = self.rows[row]
        job, config = slot.job, slot.job.config
        ids = job.tokens[slot.sequence]
        ids.append(token)
        if self.metrics is not None:
            self.metrics.tokens(1)
        job.sink("tokens", slot.sequence, list(ids))
        result = None
        if token in config.stop_token_ids:
            result = Generation(list(ids), "stop", token)
        elif job.stop_checker is not None and (found := job.stop_checker(ids)) is not None:
            result = Generation(list(ids), "stop", found)
        elif len(ids) >= config.max_new_tokens:
            result = Generation(list(ids), "length", None)
        if result is not None:
            self.rows[row] = None
            self._settings = None
            job.open_rows -= 1
            job.sink("finish", slot.sequence, result)

    def _run_whole(self, job: Job) -> None:
        """Beam search / bad words: the whole request through the Generator."""
        try:
            results = self.generator.generate([job.prompt_ids], job.config, seeds=[job.seed])
        except Exception as err:               # a request must never take the scheduler down
            job.sink("error", 0, f"generation failed: {err}")
            return
        for sequence, result in enumerate(results):
            if self.metrics is not None:
                self.metrics.tokens(len(result.token_ids))
            job.sink("tokens", sequence, list(result.token_ids))
            job.sink("finish", sequence, result)

    def _free_job(self, job: Job) -> None:
        for index, row in enumerate(self.rows):
            if row is not None and row.job is job:
                self.rows[index] = None
                self._settings = None

    def _end_job(self, job: Job, reason: str) -> None:
        job.sink("error", -1, reason)

    def _observe_queue(self) -> None:
        if self.metrics is not None:
            self.metrics.queue(len(self.queue))
