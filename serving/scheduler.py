"""The batching scheduler: a fixed set of cache slots, one compiled step over all of them.

One thread owns the model. Between decode calls it drops cancelled and expired jobs, admits
queued jobs into free slots (prefill, then the job's rows join the next step), runs up to
`steps_per_call` steps for every slot (the call ends early when a row finishes), and hands
each row's new tokens to its job's sink; a row whose job finished frees its slot at once. So
a short request never waits for a long one to finish.

    continuous: admit whenever slots are free.
    static:     admit only when every slot is free (whole requests batched together, waiting up
                to max_wait for the batch to fill): dynamic batching, the baseline.

A beam-search request of k beams takes k slots, one per beam (serving/beam_rows.py): its
beams decode in the same step as greedy and sampled rows, and its answer is read from the
decoder when its group's search ends. Admission is first come, first served: a request at the
head of the queue that needs more slots than are free (k beams, or n samples) waits for them,
and the requests behind it wait too (no overtaking, so a wide request is never starved by a
stream of narrow ones). Beam sampling, and settings past a row's caps (serving/slots.supports),
run as whole requests through the Generator between two steps of the slot batch, which pauses
for that long.
"""
from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from generation.batch import left_pad
from generation.config import BATCHING_MODES, GenerationConfig, prompt_buckets
from generation.generator import Generator
from generation.results import Generation
from model import GPTJModel
from serving.slot_decoder import SlotDecoder
from serving.slots import row_settings, supports

MODES = BATCHING_MODES               # defined beside the other CLI choices, free of TensorFlow
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
    group: list[int] = field(default_factory=list)    # a beam search's slots, in beam order
    prompt_slots: int = 0                    # its prompt's padded length (where new tokens start)


@dataclass
class Row:
    job: Job
    sequence: int


@dataclass
class LoopProfile:
    """Where the scheduler thread's time went (seconds; read by bench/serve.py). Each compiled
    call's time includes its host sync; host is the rest of the busy loop (settings, token
    hand-off, stop checks, expiry); waiting is static batching holding a batch to fill."""
    warm_up: float = 0.0          # compilation before serving
    decode: float = 0.0
    decode_calls: int = 0
    decode_steps: int = 0
    busy_row_steps: int = 0       # sum over steps of the rows decoding a request
    admit: float = 0.0
    admissions: int = 0
    whole: float = 0.0            # beam-sampling / bad-word requests through the Generator
    host: float = 0.0
    waiting: float = 0.0

    def summary(self, slots: int) -> str:
        steps, calls = max(self.decode_steps, 1), max(self.decode_calls, 1)
        busy = self.decode + self.admit + self.whole + self.host
        return (f"{self.decode_steps} steps in {self.decode_calls} calls ({self.decode_steps / calls:.1f}/call), "
                f"{self.decode / steps * 1e3:.1f} ms/step, {self.busy_row_steps / steps:.1f}/{slots} rows busy; "
                f"{self.admissions} prefills at {self.admit / max(self.admissions, 1) * 1e3:.1f} ms; "
                f"host {self.host / steps * 1e3:.2f} ms/step; share of busy time: decode "
                f"{self.decode / max(busy, 1e-9):.0%}, prefill {self.admit / max(busy, 1e-9):.0%}, host "
                f"{self.host / max(busy, 1e-9):.0%}; static batch wait {self.waiting:.2f} s")


class Scheduler:
    def __init__(self, model: GPTJModel, slots: int, cache_length: int, mode: str = "continuous",
                 max_queue: int = 64, max_wait: float = 0.02, compile_mode: str = "xla",
                 length_multiple: int = 32, metrics=None, steps_per_call: int = 8, max_beams: int = 4):
        if mode not in MODES:
            raise ValueError(f"batching mode {mode!r} is not one of {', '.join(MODES)}")
        self.decoder = SlotDecoder(model, slots, cache_length, compile_mode, steps_per_call, min(max_beams, slots))
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
        self.profile = LoopProfile()
        self._thread = threading.Thread(target=self._run, name="scheduler", daemon=True)

    # ---- client side (any thread) ----------------------------------------------------------

    def warm_up(self, max_prompt_tokens: int) -> None:
        """Compile the prefill of every prompt bucket up to max_prompt_tokens and the decode
        call now, not in the first requests' path. Before start()."""
        if self._thread.is_alive():
            raise RuntimeError("warm_up() runs before start(): the scheduler thread owns the model")
        buckets = prompt_buckets(max_prompt_tokens, self.length_multiple, self.cache_length)
        start = time.perf_counter()
        self.decoder.warm_up(buckets, self._row_settings())
        self.profile.warm_up += time.perf_counter() - start

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
            start = time.perf_counter()
            compiled = self.profile.decode + self.profile.admit + self.profile.whole
            self._expire()
            admitted = self._admit()
            if self.busy_rows:
                self._step()
            elif not admitted:
                time.sleep(0.001)     # static mode waiting for its batch to fill
                self.profile.waiting += time.perf_counter() - start
                continue
            compiled = self.profile.decode + self.profile.admit + self.profile.whole - compiled
            self.profile.host += time.perf_counter() - start - compiled

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
                waiting = sum(max(self.rows_needed(j), 1) for j in self.queue)
                oldest = self.queue[0].arrived if self.queue else None
            if oldest is None or (waiting < self.slots and time.monotonic() - oldest < self.max_wait
                                  and not self._stopped):
                return False
        admitted = False
        while True:
            with self.condition:
                if not self.queue or self.rows_needed(self.queue[0]) > len(free):
                    break
                job = self.queue.popleft()
                self._observe_queue()
            admitted = True
            needed = self.rows_needed(job)
            if needed == 0:
                self._run_whole(job)
                continue
            self._join(job, free[:needed])
            free = free[needed:]
        return admitted

    def rows_needed(self, job: Job) -> int:
        """Slots the job takes: its beams, or its samples; 0 for a whole request through the Generator."""
        config = job.config
        if not supports(config, self.decoder.max_beams):
            return 0
        return config.num_beams if config.num_beams > 1 else config.num_return_sequences

    def _join(self, job: Job, rows: list[int]) -> None:
        """Prefill the job's rows (one per sequence, or a beam group) into free slots; each gets its
        first token."""
        config = job.config
        batch = left_pad([job.prompt_ids], config.pad_token_id, self.length_multiple)
        if config.num_beams > 1:
            start = time.perf_counter()
            _, ended = self.decoder.admit(rows, batch.tokens, batch.first_slot,
                                          row_settings([config], [job.seed], [0]), config)
            self.profile.admit += time.perf_counter() - start
            self.profile.admissions += 1
            job.group, job.prompt_slots, job.open_rows = rows, batch.prompt_slots, len(rows)
            for beam, row in enumerate(rows):
                self.rows[row] = Row(job, beam)
            self._settings = None
            if self.metrics is not None:
                self.metrics.first_token(time.monotonic() - job.arrived)
            if ended:
                self._finish_group(job)
            return
        job.tokens = [[] for _ in rows]
        job.open_rows = len(rows)
        for sequence, row in enumerate(rows):
            start = time.perf_counter()
            first, _ = self.decoder.admit(row, batch.tokens, batch.first_slot,
                                          row_settings([config], [job.seed], [sequence]))
            self.profile.admit += time.perf_counter() - start
            self.profile.admissions += 1
            self.rows[row] = Row(job, sequence)
            self._settings = None
            if self.metrics is not None:
                self.metrics.first_token(time.monotonic() - job.arrived)
            self._take(row, int(first[0]))

    def _row_settings(self):
        configs = [r.job.config if r else IDLE for r in self.rows]
        return row_settings(configs, [r.job.seed if r else 0 for r in self.rows],
                            [0 if r is None or r.job.group else r.sequence for r in self.rows])

    def _groups(self):
        return self.decoder.groups([r.job.config if r else IDLE for r in self.rows],
                                   [r.job.group if r else () for r in self.rows])

    def _step(self) -> None:
        """One decode call: up to steps_per_call tokens per row, ending early when a row
        reaches a stop id or its max_new_tokens (stop strings are checked here, per token)."""
        if self._settings is None:
            self._settings = self._row_settings(), self._groups()
        # free rows and beams never end a call by budget (a beam group ends it when its search ends)
        budget = np.full([self.slots], self.decoder.steps_per_call + 1, np.int32)
        for index, row in enumerate(self.rows):
            if row is not None and not row.job.group:
                budget[index] = row.job.config.max_new_tokens - len(row.job.tokens[row.sequence])
        start = time.perf_counter()
        chosen, ended = self.decoder.decode(self._settings[0], budget, groups=self._settings[1])  # [steps, S], [S]
        self.profile.decode += time.perf_counter() - start
        self.profile.decode_calls += 1
        self.profile.decode_steps += len(chosen)
        for tokens in chosen:
            self.profile.busy_row_steps += self.busy_rows
            if self.metrics is not None:
                self.metrics.step(self.busy_rows, self.slots)
            for row, token in enumerate(tokens):
                if self.rows[row] is not None and not self.rows[row].job.group:
                    self._take(row, int(token))
        ended_jobs = {id(self.rows[row].job): self.rows[row].job for row in np.flatnonzero(ended) if self.rows[row]}
        for job in ended_jobs.values():
            self._finish_group(job)

    def _finish_group(self, job: Job) -> None:
        """A beam group's search ended: its best hypotheses are the answer; its slots free."""
        config = job.config
        results = self.decoder.hypotheses(job.group, job.prompt_slots, config.num_return_sequences, config)
        self._free_job(job)
        job.open_rows = 0
        for sequence, result in enumerate(results):
            if self.metrics is not None:
                self.metrics.tokens(len(result.token_ids))
            job.sink("tokens", sequence, list(result.token_ids))
            job.sink("finish", sequence, result)

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
        """Beam sampling, or settings past a row's caps: the whole request through the Generator."""
        start = time.perf_counter()
        try:
            results = self.generator.generate([job.prompt_ids], job.config, seeds=[job.seed])
        except Exception as err:               # a request must never take the scheduler down
            job.sink("error", 0, f"generation failed: {err}")
            return
        finally:
            self.profile.whole += time.perf_counter() - start
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
