"""Sizing a training run from the model's shapes: bytes per device for each layout and the
step time an assumed MFU gives. Plain arithmetic (no TensorFlow); bench/plan.py prints it.

The bytes come from the project's one memory model, runtime/memory_model.py (the preflight
every command runs reads it too): what a device keeps per parameter and per token, tensor
parallelism's splits and weight streaming's pieces are argued there. This module lays those
terms out per layout and adds the time a step takes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from config.params import ModelParams, OptimizerParams
from runtime.memory_model import (StateBytes, activation_bytes, host_state, optimizer_slots, replicated_state,
                                  streaming_device_state)
from runtime.model_flops import training_flops_per_token

RECOMPUTE_FACTOR = 4.0 / 3.0                      # forward is 2N + attention of 6N + attention: a third


# ---- layouts --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Layout:
    data: int
    tensor: int = 1
    streaming: bool = False

    @property
    def devices(self) -> int:
        return self.data * self.tensor

    @property
    def name(self) -> str:
        if self.streaming:
            return "streaming" + (f" x data {self.data}" if self.data > 1 else "")
        if self.tensor == 1:
            return f"data {self.data}"
        return f"tensor {self.tensor}" if self.data == 1 else f"data {self.data} x tensor {self.tensor}"


@dataclass(frozen=True)
class Hardware:
    device_memory: float            # bytes per device
    peak_flops: float | None        # FLOP/s per device at the run's precision, None: no step time
    host_memory: float | None       # bytes on the host (weight streaming's state), None: unchecked
    host_link: float | None         # bytes/s host <-> device, per direction, None: unknown
    host_bandwidth: float           # bytes/s of host memory (the streaming optimizer update)
    disk_bandwidth: float           # bytes/s of the disk store


@dataclass(frozen=True)
class Run:
    model: ModelParams
    optimizer: OptimizerParams
    precision: str                  # "fp32" | "mixed"
    global_batch: int               # sequences per step
    sequence_length: int
    micro_batch: int | None         # sequences per replica per micro-step; None: from grad_accum
    grad_accum: int | None
    recompute: bool
    mfu: float
    host_store: str                 # "memory" | "disk"
    prefetch_blocks: int


@dataclass(frozen=True)
class Plan:
    layout: Layout
    micro_batch: int
    grad_accum: int
    state: StateBytes               # per device
    activations: float              # per device
    host: StateBytes | None         # weight streaming only
    step_seconds: float | None      # None without a peak
    tokens_per_second: float | None
    mfu: float | None               # achieved: model FLOPs (no recompute) over the layout's peak
    notes: tuple[str, ...]

    @property
    def device_total(self) -> float:
        return self.state.total + self.activations


def batch_split(run: Run, data: int) -> tuple[int, int, tuple[str, ...]]:
    """(micro-batch, accumulation steps, notes) of one data-parallel replica."""
    per_replica = run.global_batch / data
    if run.micro_batch is not None:
        micro, accum = run.micro_batch, math.ceil(per_replica / run.micro_batch)
    else:
        accum = run.grad_accum or 1
        micro = max(1, math.ceil(per_replica / accum))
    notes = ()
    if micro * accum * data != run.global_batch:
        notes = (f"batch {run.global_batch} does not split into {data} x {micro} x {accum}: "
                 f"sized for {micro * accum * data}",)
    return micro, accum, notes


def plan_layout(run: Run, hardware: Hardware, layout: Layout) -> Plan:
    micro, accum, notes = batch_split(run, layout.data)
    model, seq = run.model, run.sequence_length
    recompute = run.recompute or layout.streaming
    activations = activation_bytes(model, run.precision, seq, micro * seq, layout.tensor, recompute)
    host = None
    if layout.streaming:
        state = streaming_device_state(model, run.precision, run.prefetch_blocks)
        host = host_state(model, run.optimizer)
    else:
        state = replicated_state(model, run.optimizer, run.precision, layout.tensor, accum > 1)
    if hardware.peak_flops is None:
        return Plan(layout, micro, accum, state, activations, host, None, None, None, notes)
    tokens = micro * accum * layout.data * seq
    if layout.streaming:
        step, more = streaming_step_seconds(run, hardware, host, layout, micro, accum)
        notes += more
    else:
        step = compute_seconds(run, hardware, tokens / layout.devices, recompute)
    achieved = tokens * training_flops_per_token(model, seq) / (step * hardware.peak_flops * layout.devices)
    return Plan(layout, micro, accum, state, activations, host, step, tokens / step, achieved, notes)


def compute_seconds(run: Run, hardware: Hardware, tokens: float, recompute: bool) -> float:
    """Time for one device to train `tokens` tokens at the assumed MFU. The MFU is taken as the
    rate of useful FLOPs a step without recomputation reaches; a recomputed forward is one more
    third of the work at that rate (so the achieved MFU is 3/4 of it)."""
    work = tokens * training_flops_per_token(run.model, run.sequence_length)
    return work * (RECOMPUTE_FACTOR if recompute else 1.0) / (hardware.peak_flops * run.mfu)


def streaming_step_seconds(run: Run, hardware: Hardware, host: StateBytes, layout: Layout, micro: int,
                           accum: int) -> tuple[float, tuple[str, ...]]:
    """Each micro-step copies every float32 weight to the device twice (forward, recompute) and
    its gradients back, at the host link's rate or the replicas' share of host memory bandwidth,
    whichever is lower; with prefetch the copies overlap the compute, without it they add. Then
    the update runs on the host: AdamW reads weights, gradients and both moments and writes three
    of them back (7 x 4 B/param of memory traffic); the disk store moves about 11 x the parameter
    bytes per step (docs/runtime.md), counted as not overlapped."""
    compute = compute_seconds(run, hardware, micro * run.sequence_length, recompute=True)
    notes = []
    share = hardware.host_bandwidth / layout.data
    if hardware.host_link is None:
        copy = 0.0
        notes.append("no host link bandwidth for this device (--host-link-gbps): copies not counted")
    else:
        copy = 2 * host.weights / min(hardware.host_link, share)
        if copy > compute:
            bound = "host link" if hardware.host_link <= share else f"host memory shared by {layout.data} streams"
            notes.append(f"{bound} bound: copies {copy:.3g} s vs compute {compute:.3g} s per micro-step")
    micro_step = max(compute, copy) if run.prefetch_blocks > 0 else compute + copy
    if run.host_store == "disk":
        update = 11 * host.weights / hardware.disk_bandwidth
    else:
        update = (3 + 2 * optimizer_slots(run.optimizer)) * host.weights / hardware.host_bandwidth
    return accum * micro_step + update, tuple(notes)


def fits(used: float, available: float | None) -> str:
    """yes below 90% (room for workspaces, fragmentation), tight up to 100%, else no."""
    if available is None:
        return "not checked"
    if used <= 0.9 * available:
        return "yes"
    return "tight" if used <= available else "no"
