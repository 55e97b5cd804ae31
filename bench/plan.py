"""Size a training run before renting the machines: per-device memory of each layout and the
step time an assumed MFU gives.

    python -m bench.plan --params configs/params_gptj_6B.yaml --devices 8 --device a100-80g
    python -m bench.plan --params configs/params_gptneox_20B.yaml --devices 8 --device-memory 80 --peak-tflops 312
    python -m bench.plan --params configs/params_gptj_6B.yaml --device rtx4090-24g --host-memory 128

Layouts: data parallel (everything replicated), data x tensor parallel for every degree that
divides the devices and the heads, and weight streaming (alone, or one stream per device with
data parallelism). The arithmetic and its arguments: runtime/memory_model.py (the bytes, shared
with the memory preflight), bench/sizing.py (layouts, step time) and docs/scaling.md. It reads
only the params file: no TensorFlow, no device.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

from bench import sizing
from config.cli import ArgumentParser
from config.params import ParamsError, load_params
from runtime import memory_model
from runtime.model_flops import training_flops_per_token

GiB = float(1 << 30)
DEFAULT_MFU = 0.40        # what well-tuned dense training reaches on current GPUs (docs/scaling.md)


@dataclass(frozen=True)
class Device:
    memory_gib: float
    peak_tflops: dict          # {"mixed": dense bf16/fp16 tensor peak, "fp32": fp32 peak or None}
    host_link_gbps: float | None   # host <-> device GB/s per direction, nominal
    source: str


# Published dense (no sparsity) peaks, from the vendors' datasheets.
PRESETS = {
    "a100-80g": Device(80, {"mixed": 312, "fp32": 19.5}, 32,
                       "A100 80GB SXM: 312 TFLOPS BF16/FP16 dense, 19.5 FP32 (156 TF32); PCIe 4.0 x16"),
    "h100-80g": Device(80, {"mixed": 989.4, "fp32": 66.9}, 64,
                       "H100 80GB SXM: 989 TFLOPS BF16/FP16 dense, 67 FP32; PCIe 5.0 x16"),
    "rtx4090-24g": Device(24, {"mixed": 165.2, "fp32": 82.6}, 32,
                          "RTX 4090: 165 TFLOPS BF16/FP16 dense with FP32 accumulate, 82.6 FP32; PCIe 4.0 x16"),
    "a10-24g": Device(24, {"mixed": 125, "fp32": 31.2}, 32,
                      "A10: 125 TFLOPS BF16/FP16 dense, 31.2 FP32; PCIe 4.0 x16"),
    "tpu-v3-core": Device(16, {"mixed": 61.5, "fp32": None}, None,
                          "TPU v3: 123 TFLOPS BF16 per chip of two cores, 16 GiB HBM per core"),
}


class PlanError(ValueError):
    """Bad input: printed as one `error:` line."""


def _positive(kind):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a{'n integer' if kind is int else ' number'}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"{text} must be positive")
        return value
    parse.__name__ = f"positive {kind.__name__}"
    return parse


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m bench.plan", description=__doc__.split("\n\n")[0])
    p.add_argument("--params", required=True, help="params YAML; its model section is what is sized")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a params key, as run.py does (e.g. model.num_hidden_layers=32)")
    p.add_argument("--devices", type=_positive(int), default=1, help="number of compute devices (default 1)")
    p.add_argument("--device", choices=sorted(PRESETS),
                   help="a device preset: its memory, published dense peaks and host link")
    p.add_argument("--device-memory", type=_positive(float), metavar="GB",
                   help="memory per device in GiB (default: the preset's)")
    p.add_argument("--peak-tflops", type=_positive(float),
                   help="peak dense TFLOP/s per device at the run's precision (default: the preset's)")
    p.add_argument("--host-memory", type=_positive(float), metavar="GB",
                   help="host RAM in GiB that weight streaming's state must fit (default: not checked)")
    p.add_argument("--host-link-gbps", type=_positive(float),
                   help="host <-> device copy bandwidth, GB/s per direction (default: the preset's PCIe)")
    p.add_argument("--host-bandwidth-gbps", type=_positive(float), default=100.0,
                   help="host memory bandwidth, GB/s: weight streaming's copies share it, its optimizer "
                        "update reads it (default 100; a 2-socket DDR4-3200 server has 400, a desktop 60-90)")
    p.add_argument("--disk-gbps", type=_positive(float), default=2.0,
                   help="disk bandwidth of host_store: disk, GB/s (default 2, one NVMe drive)")
    p.add_argument("--mfu", type=_positive(float), default=DEFAULT_MFU,
                   help=f"assumed model FLOPs utilisation of a step without recomputation (default {DEFAULT_MFU})")
    p.add_argument("--global-batch", type=_positive(int),
                   help="sequences per optimizer step (default: train_input.batch_size)")
    p.add_argument("--seq-len", type=_positive(int),
                   help="tokens per sequence (default: train_input.max_sequence_length)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--micro-batch", type=_positive(int),
                       help="sequences per data-parallel replica per micro-step (default 1)")
    group.add_argument("--grad-accum", type=_positive(int),
                       help="micro-steps per optimizer step instead (the micro-batch follows per layout)")
    p.add_argument("--precision", choices=["fp32", "mixed"],
                   help="fp32, or mixed: 16-bit compute with float32 master weights (default: model.mixed_precision)")
    p.add_argument("--recompute", choices=["on", "off"], default="off",
                   help="activation recomputation (full, per block); weight streaming always recomputes")
    p.add_argument("--tensor-parallel", type=_positive(int),
                   help="list only this tensor-parallel degree (default: every one dividing devices and heads)")
    p.add_argument("--host-store", choices=["memory", "disk"],
                   help="weight streaming's store (default: runconfig.weight_streaming.host_store)")
    p.add_argument("--prefetch-blocks", type=int,
                   help="weight streaming's pieces copied ahead (default: runconfig.weight_streaming.prefetch_blocks)")
    return p


def tensor_degrees(model, devices: int, requested: int | None) -> list[int]:
    """Tensor-parallel degrees to list: M must divide the devices, the heads and the MLP width."""
    def problem(m: int) -> str | None:
        for what, count in (("--devices", devices), ("model.num_heads", model.num_heads),
                            ("model.filter_size", model.filter_size)):
            if count % m:
                return f"--tensor-parallel {m} does not divide {what}={count}"
        return None
    if requested is not None:
        if problem(requested):
            raise PlanError(problem(requested))
        return sorted({1, requested})
    return [m for m in range(1, devices + 1) if problem(m) is None]


def resolve(args):
    """(Run, Hardware, layouts, description lines) from the flags and the params file."""
    try:
        params = load_params(args.params, args.set)
    except (ParamsError, OSError) as err:
        raise PlanError(str(err)) from None
    model, streaming = params.model, params.runconfig.weight_streaming
    preset = PRESETS.get(args.device)
    precision = args.precision or ("mixed" if model.mixed_precision else "fp32")
    memory = args.device_memory or (preset.memory_gib if preset else None)
    peak = args.peak_tflops or (preset.peak_tflops[precision] if preset else None)
    if memory is None:
        raise PlanError(f"--device-memory is required without --device (presets: {', '.join(sorted(PRESETS))})")
    if args.mfu > 1:
        raise PlanError(f"--mfu {args.mfu} is a fraction of the peak: give a value in (0, 1]")
    prefetch = streaming.prefetch_blocks if args.prefetch_blocks is None else args.prefetch_blocks
    if prefetch < 0:
        raise PlanError(f"--prefetch-blocks {prefetch} must be >= 0")
    train = params.train_input
    seq = args.seq_len or (train.max_sequence_length if train else model.max_position_embeddings)
    if seq > model.max_position_embeddings:
        raise PlanError(f"--seq-len {seq} exceeds model.max_position_embeddings={model.max_position_embeddings}")
    batch = args.global_batch or (train.batch_size if train else 1)
    micro = None if args.grad_accum else (args.micro_batch or 1)
    run = sizing.Run(model, params.optimizer, precision, batch, seq, micro, args.grad_accum,
                     args.recompute == "on", args.mfu, args.host_store or streaming.host_store, prefetch)
    link = args.host_link_gbps or (preset.host_link_gbps if preset else None)
    hardware = sizing.Hardware(memory * GiB, None if peak is None else peak * 1e12,
                               None if args.host_memory is None else args.host_memory * GiB,
                               None if link is None else link * 1e9, args.host_bandwidth_gbps * 1e9,
                               args.disk_gbps * 1e9)
    layouts = [sizing.Layout(args.devices // m, m) for m in tensor_degrees(model, args.devices, args.tensor_parallel)]
    layouts.append(sizing.Layout(args.devices, 1, streaming=True))
    return run, hardware, layouts, describe(run, hardware, args, preset)


def describe(run, hardware, args, preset) -> list[str]:
    m = run.model
    count = memory_model.parameter_count(m)
    flops = training_flops_per_token(m, run.sequence_length)
    device = f"{args.device} ({preset.source})" if preset else "custom device"
    return [
        f"model: {args.params}: {count:,} parameters, {m.num_hidden_layers} layers, hidden {m.hidden_size}, "
        f"{m.num_heads} heads, MLP {m.filter_size}, vocab {m.vocab_size}",
        f"run: {run.global_batch} x {run.sequence_length} tokens per step, {run.precision} precision, "
        f"{run.optimizer.optimizer_type}, recompute {'on' if run.recompute else 'off'}, "
        f"{figure(flops / 1e9)} GFLOP per token (6N + attention)",
        f"hardware: {args.devices} x {device}: {hardware.device_memory / GiB:g} GiB, "
        + (f"no {run.precision} peak known (--peak-tflops): no step time" if hardware.peak_flops is None else
           f"{hardware.peak_flops / 1e12:g} TFLOP/s peak, assumed MFU {run.mfu:.0%}")
        + ("" if hardware.host_memory is None else f"; host {hardware.host_memory / GiB:g} GiB"),
    ]


def figure(value: float) -> str:
    """One decimal from 10 up, three significant digits below (a tiny model's 0.00234 GiB)."""
    return f"{value:.1f}" if value >= 10 else f"{value:.3g}"


def table(plans, hardware, run) -> list[str]:
    fits = sizing.fits
    rows = [["layout", "micro x accum", "weights", "grads", "optimizer", "activations", "total/device",
             "fits", "streaming host state", "step s", "tokens/s", "MFU"]]
    notes = []
    for plan in plans:
        host = ""
        if plan.host is not None:
            where = "disk" if run.host_store == "disk" else "RAM"
            host = f"{figure(plan.host.total / GiB)} GiB {where}"
            if run.host_store == "memory":
                host += f": {fits(plan.host.total, hardware.host_memory)}"
        rows.append([plan.layout.name, f"{plan.micro_batch} x {plan.grad_accum}",
                     *(figure(b / GiB) for b in (plan.state.weights, plan.state.gradients, plan.state.optimizer,
                                                  plan.activations, plan.device_total)),
                     fits(plan.device_total, hardware.device_memory), host,
                     *(("-",) * 3 if plan.step_seconds is None else
                       (figure(plan.step_seconds), f"{plan.tokens_per_second:,.0f}", f"{plan.mfu:.0%}"))])
        notes += [f"{plan.layout.name}: {note}" for note in plan.notes]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["| " + " | ".join(cell.ljust(w) for cell, w in zip(row, widths)) + " |" for row in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return lines + [""] + [f"note: {n}" for n in dict.fromkeys(notes)]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run, hardware, layouts, header = resolve(args)
    except PlanError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    plans = [sizing.plan_layout(run, hardware, layout) for layout in layouts]
    legend = ("memory in GiB per device; fits: yes below 90% of the device, tight up to 100%; MFU: the model "
              "FLOPs utilisation achieved (recomputation and streaming's copies take it below the assumed one)")
    print("\n".join(header + ["", legend, ""] + table(plans, hardware, run)))
    if any(p.layout.streaming and p.layout.data > 1 for p in plans):
        print("note: the runtime streams on one device today (runtime/weight_streaming.py); streaming x data "
              "is what one stream per device would cost, sharing one host store")
    return 0


if __name__ == "__main__":
    sys.exit(main())
