"""Benchmark: GPT-J-6B-sized generation on this machine, ours (int8, bfloat16) against
transformers (PyTorch, bfloat16) on one checkpoint.

    python -m bench.real_size --work-dir /data/real_size            # the 6B shape, 28 layers (~15 GB RAM)
    python -m bench.real_size --work-dir /data/real_size --layers 2 # the same width, 2 layers (quick)
    python -m bench.real_size --work-dir /data/real_size --clean    # delete the cached files

It writes a GPT-J-6B-shaped Hugging Face checkpoint itself (vocab 50400, hidden 4096, 28
layers, 16 heads, rotary_dim 64, n_inner 16384, untied head with bias: 6,050,882,784
parameters) with seeded random weights, as bfloat16 safetensors shards, tensor by tensor, and
keeps it under --work-dir for later runs (one directory per shape; a marker written last says
it is complete). Then each step runs in its own process, so each has its own peak RSS:

  bandwidth     the machine's memory read bandwidth (NumPy sums over --bandwidth-gib)
  convert       python -m checkpoint_utils.convert_hf (bfloat16 output where it has --dtype)
  ours, per --formats: load the converted checkpoint; prefill --prompt tokens (MLPerf's
                GPT-J input cap is 1919); greedy decode of --new tokens at batch 1; beam search
                with --beams beams on --beam-prompt tokens
  transformers  GPTJForCausalLM in bfloat16 on the safetensors, torch threads 2: the same
                figures through `generate`

Decode tokens/s time --new steps after two warm-up tokens (ours: both compiled functions are
compiled by then). Beam search tokens/s counts steps (each extends all beams). It prints the
bandwidth a decode step reaches (bytes it reads: every weight but the embedding table, plus
the key/value cache) and how many cores it keeps busy (process CPU time / wall time).
Targets: int8 decode >= 1.5x transformers' bfloat16, our bfloat16 decode >= 1.2x, prefill >= 1.0x.

Quality: each model step saves its logits on --quality-prompts random prompts; our bfloat16
is compared with transformers' bfloat16 and our int8 with our bfloat16, against an error size
argued from the arithmetic (see `rounding_estimate`, `int8_estimate`).
"""
from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time

import numpy as np

from bench.shapes import add_shape_flags
from checkpoint_utils.rounding import int8_logits_error
from config.cli import ArgumentParser
from config.files import atomic_write_text

GB, GIB = 1e9, 2**30
WORK_MARKER = "REAL_SIZE_BENCH"          # in --work-dir: what --clean may delete
COMPLETE = "COMPLETE.json"               # in a checkpoint directory: written last
U_BF16 = 2.0 ** -9                       # bfloat16 unit roundoff: 8 significand bits, round to nearest
MAX_OVER_RMS = 6.0                       # a max over <= 1e8 Gaussian errors stays within 6 RMS (p ~ 0.2)
TARGETS = {"int8": 1.5, "bfloat16": 1.2}  # decode vs transformers' bfloat16
PREFILL_TARGET = 1.0


class WorkDirError(ValueError):
    """--work-dir cannot be used as asked."""


# ---- the checkpoint ------------------------------------------------------------------------

def shape_key(args) -> str:
    return (f"gptj-h{args.hidden}-l{args.layers}-heads{args.heads}-r{args.rotary_dim}-v{args.vocab}"
            f"-seed{args.seed}")


def claim_work_dir(work: str) -> None:
    """Create --work-dir, or check it is one of ours (so --clean never deletes anything else)."""
    if os.path.isdir(work) and os.listdir(work) and not os.path.exists(os.path.join(work, WORK_MARKER)):
        raise WorkDirError(f"--work-dir {work} holds files that bench.real_size did not write; "
                           "give a new or empty directory")
    os.makedirs(work, exist_ok=True)
    atomic_write_text(os.path.join(work, WORK_MARKER), "bench.real_size work directory: cached checkpoints "
                                                       "and results; `--clean` deletes it\n")


def ensure_checkpoint(directory: str, args) -> tuple[dict, bool]:
    """(its description, reused?): the cached checkpoint of this shape, built unless complete."""
    from bench.convert import make_checkpoint
    marker = os.path.join(directory, COMPLETE)
    wanted = {"hidden": args.hidden, "layers": args.layers, "heads": args.heads, "rotary_dim": args.rotary_dim,
              "vocab": args.vocab, "seed": args.seed, "dtype": "bfloat16"}
    if os.path.exists(marker):
        with open(marker, encoding="utf-8") as f:
            info = json.load(f)
        if info["shape"] == wanted:
            return info, True
    shutil.rmtree(directory, ignore_errors=True)       # incomplete: an interrupted build
    start = time.time()
    size = make_checkpoint(directory, args.hidden, args.layers, args.vocab, int(args.shard_gb * GIB),
                           heads=args.heads, rotary_dim=args.rotary_dim, dtype="bfloat16", seed=args.seed)
    shards = sum(name.endswith(".safetensors") for name in os.listdir(directory))
    info = {"shape": wanted, "parameters": size // 2, "bytes": size, "shards": shards,
            "build_seconds": time.time() - start}
    atomic_write_text(marker, json.dumps(info, indent=1))
    return info, False


# ---- steps ---------------------------------------------------------------------------------

def run_step(name: str, command: list[str], result_file: str | None = None) -> dict:
    """Run one step in its own process -> {"seconds", "peak_rss", **the JSON it wrote to result_file}
    or {"error"}."""
    from bench.convert import run_with_peak
    if result_file and os.path.exists(result_file):
        os.unlink(result_file)
    print(f"[{time.strftime('%H:%M:%S')}] {name} ...", flush=True)
    run = run_with_peak(command)
    out = {"seconds": run.seconds, "peak_rss": run.peak}
    if result_file and os.path.exists(result_file):
        with open(result_file, encoding="utf-8") as f:
            out.update(json.load(f))          # a step that stopped early wrote what it had
    if run.returncode != 0:
        out["error"] = out.get("stopped") or f"exit {run.returncode}: {run.output.strip().splitlines()[-1:]}"
        print(f"  {name} failed ({out['error']}); its output ends:\n    " +
              "\n    ".join(run.output.strip().splitlines()[-6:]), flush=True)
    else:
        print(f"  {name}: {run.seconds:.1f}s, peak RSS {run.peak / GIB:.2f} GiB", flush=True)
    return out


def run_measured_step(name: str, results: str, step: str, *flags: str) -> dict:
    """A step of bench.real_size_steps, its figures in results/<name>.json."""
    result_file = os.path.join(results, f"{name}.json")
    return run_step(name, [sys.executable, "-m", "bench.real_size_steps", step, *flags, "--result", result_file],
                    result_file)


# ---- quality -------------------------------------------------------------------------------

def rounding_estimate(layers: int) -> float:
    """RMS difference of two bfloat16 evaluations of the logits, relative to the logits' std.

    On the way to a logit each block rounds ~10 values to bfloat16 (normed input, q, k, v,
    scores, probabilities, attention output, projection, fc_in, fc_out; dots accumulate in float32)
    and the embedding, final norm and head 3 more: R = 10 L + 3 roundings of relative size <= u.
    LayerNorm keeps every value at the scale its rounding is relative to, and a kernel of random
    weights maps a relative perturbation of its input to the same relative size of its output, so
    the roundings reach a logit as R independent perturbations of <= u of its scale: a random walk,
    sqrt(R) u. Two implementations round independently: sqrt(2 R) u."""
    return math.sqrt(2 * (10 * layers + 3)) * U_BF16


def int8_estimate(layers: int, hidden: int, inner: int) -> float:
    """RMS difference of our int8 and bfloat16 logits, relative to the logits' std: the int8
    format's own error (checkpoint_utils.rounding.int8_logits_error) plus the bfloat16 side's
    roundings (int8 computes in float32)."""
    return math.sqrt(int8_logits_error(layers, hidden, inner) ** 2 + (10 * layers + 3) * U_BF16 ** 2)


def compare_logits(reference: np.ndarray, other: np.ndarray, relative_estimate: float) -> dict:
    """[n, s, V] logits of two computations: error sizes, top-1 agreement over every position, and
    the agreement expected from the measured error size (a position flips when the error of its
    top-2 difference, ~N(0, 2 rms^2), exceeds its top-2 gap)."""
    delta = np.abs(other.astype(np.float64) - reference)
    rms = float(np.sqrt(np.mean(delta ** 2)))
    top2 = np.sort(reference, axis=-1)[..., -2:]
    gap = (top2[..., 1] - top2[..., 0]).reshape(-1)
    flips = 0.5 * np.vectorize(math.erfc)(gap / (2 * rms)) if rms > 0 else np.zeros_like(gap)
    spread = float(reference.std())
    estimate = relative_estimate * spread
    return {"max": float(delta.max()), "rms": rms, "std": spread, "estimate": estimate,
            "within": bool(delta.max() <= MAX_OVER_RMS * estimate),
            "top1": float((reference.argmax(-1) == other.argmax(-1)).mean()),
            "expected_top1": float(1 - flips.mean()), "positions": int(gap.size)}


# ---- report --------------------------------------------------------------------------------

def decode_figures(side: dict, part: str, bandwidth: float | None) -> dict:
    """tokens/s, cores busy and the share of the bandwidth reached by one decode (greedy|beam)."""
    run = side.get(part) or {}
    if "decode_s" not in run:
        return {"skipped": run.get("skipped", side.get("error", "not run"))}
    per_second = run["decode_steps"] / run["decode_s"]
    out = {"tokens_per_s": per_second, "cores": run["decode_cpu_s"] / run["decode_s"]}
    if part == "greedy":
        rate = (side["weight_bytes"] + side["cache_bytes"]) * per_second
        out.update(bytes_per_step=side["weight_bytes"] + side["cache_bytes"], rate=rate,
                   of_bandwidth=rate / bandwidth if bandwidth else float("nan"))
    return out


def ratio_line(name: str, ours: float | None, theirs: float | None, target: float | None) -> str:
    if not ours or not theirs:
        return f"  {name}: not measured"
    ratio = ours / theirs
    verdict = "" if target is None else (f" (target >= {target:.1f}x: " +
                                         ("met)" if ratio >= target else "MISSED)"))
    return f"  {name}: {ratio:.2f}x{verdict}"


def cell(value, spec: str) -> str:
    width = "".join(c for c in spec if c.isdigit() or c == ".").split(".")[0]
    return format(value, spec) if value is not None else format("-", f">{width}")


def print_steps(steps: dict) -> None:
    print(f"{'step':<26} {'time s':>8} {'peak RSS GiB':>13}")
    for name, step in steps.items():
        if name == "bandwidth":
            continue
        load = f"  (load {step['load_s']:.1f}s)" if "load_s" in step else ""
        failed = f"  FAILED: {step['error']}" if "error" in step else ""
        print(f"{name:<26} {step['seconds']:>8.1f} {step['peak_rss'] / GIB:>13.2f}{load}{failed}")


def print_sides(args, sides: dict, bandwidth: float | None) -> dict:
    """The speed table; returns {side: {"prefill", "greedy", "beam"} tokens/s} for the ratios."""
    print(f"\n{'side':<24} {'load s':>7} {'prefill t/s':>12} {'greedy t/s':>11} {'beam t/s':>9} "
          f"{'cores':>6} {'GB/step':>8} {'GB/s':>6} {'of bw':>6}")
    figures = {}
    for name, side in sides.items():
        greedy, beam = decode_figures(side, "greedy", bandwidth), decode_figures(side, "beam", bandwidth)
        prefill = args.prompt / side["greedy"]["prefill_s"] if "greedy" in side else None
        figures[name] = {"prefill": prefill, "greedy": greedy.get("tokens_per_s"), "beam": beam.get("tokens_per_s")}
        step_bytes = greedy.get("bytes_per_step")
        print(f"{name:<24} {cell(side.get('load_s'), '>7.1f')} {cell(prefill, '>12.1f')} "
              f"{cell(greedy.get('tokens_per_s'), '>11.2f')} {cell(beam.get('tokens_per_s'), '>9.2f')} "
              f"{cell(greedy.get('cores'), '>6.2f')} {cell(step_bytes and step_bytes / GB, '>8.2f')} "
              f"{cell(greedy.get('rate') and greedy['rate'] / GB, '>6.1f')} {cell(greedy.get('of_bandwidth'), '>6.0%')}")
        if "skipped" in beam and "error" not in side:
            print(f"{'':<24} beam search skipped: {beam['skipped']}")
        memory = side.get("memory", {})
        if memory:
            print(f"{'':<24} memory GiB (RSS / peak) after " + ", ".join(
                f"{phase} {m['rss'] / GIB:.1f}/{m['peak'] / GIB:.1f}" for phase, m in memory.items()))
    print("  (GB/step: bytes a decode step reads, every weight but the embedding table plus the key/value "
          "cache; GB/s: that times steps/s; of bw: share of the best read bandwidth above; cores: process CPU "
          "time / wall time while decoding)")
    return figures


def print_report(args, info: dict, reused: bool, steps: dict) -> None:
    band = steps.get("bandwidth", {})
    bandwidth = max(band.get("read_1_thread", 0), band.get("read_all_cores", 0)) or None
    print(f"\nmodel: GPT-J shape hidden {args.hidden}, {args.layers} layers, {args.heads} heads, rotary_dim "
          f"{args.rotary_dim}, n_inner {4 * args.hidden}, vocab {args.vocab}: {info['parameters']:,} parameters, "
          f"{info['bytes'] / GB:.2f} GB bfloat16 in {info['shards']} shards "
          f"({'reused' if reused else 'built in %.0fs' % info['build_seconds']})")
    if bandwidth:
        print(f"memory bandwidth (NumPy over {band['bytes'] / GIB:.1f} GiB): read {band['read_1_thread'] / GB:.1f} GB/s "
              f"on 1 thread, {band['read_all_cores'] / GB:.1f} GB/s on {band['cores']}; copy "
              f"{band['copy_1_thread'] / GB:.1f} GB/s (read + write)")
    print(f"prompt {args.prompt} tokens (beam search: {args.beam_prompt}), {args.new} timed decode steps, batch 1; "
          f"ours load from the {args.load_from} checkpoint\n")
    print_steps(steps)
    sides = {name: step for name, step in steps.items() if name.startswith(("ours", "transformers"))}
    figures = print_sides(args, sides, bandwidth)
    theirs = figures.get("transformers bfloat16", {})
    print("\nagainst transformers bfloat16 (same checkpoint, same run):")
    for weight_format in args.formats:
        ours = figures.get(f"ours {weight_format}", {})
        print(ratio_line(f"{weight_format} greedy decode", ours.get("greedy"), theirs.get("greedy"),
                         TARGETS.get(weight_format)))
        print(ratio_line(f"{weight_format} prefill", ours.get("prefill"), theirs.get("prefill"), PREFILL_TARGET))
        print(ratio_line(f"{weight_format} beam-{args.beams} decode", ours.get("beam"), theirs.get("beam"), None))
    print_quality(args, sides)


def print_quality(args, sides: dict) -> None:
    logits = {name: np.load(side["logits"]) for name, side in sides.items()      # saved by this run
              if "quality" in side.get("memory", {})}
    pairs = [("ours bfloat16", "transformers bfloat16", rounding_estimate(args.layers),
              "sqrt(2 R) u, R = 10 L + 3 bf16 roundings, u = 2^-9"),
             ("ours int8", "ours bfloat16", int8_estimate(args.layers, args.hidden, 4 * args.hidden),
              "int8 error of each kernel on the path + bf16 roundings")]
    shown = [p for p in pairs if p[0] in logits and p[1] in logits]
    if not shown:
        return
    print(f"\nquality: logits on {args.quality_prompts} random prompts x {args.quality_length} positions; "
          f"estimate = expected RMS difference, max should stay within {MAX_OVER_RMS:.0f}x it")
    for other, reference, relative, argument in shown:
        c = compare_logits(logits[reference], logits[other], relative)
        print(f"  {other} vs {reference}: max |d| {c['max']:.4f}, rms {c['rms']:.4f} (logit std {c['std']:.3f}; "
              f"estimate {c['estimate']:.4f} = {relative:.4f} std from {argument}): "
              f"{'within' if c['within'] else 'BEYOND'} {MAX_OVER_RMS:.0f}x the estimate")
        print(f"      top-1 agreement {c['top1']:.1%} over {c['positions']} positions (expected from the "
              f"measured rms and each position's top-2 gap: {c['expected_top1']:.1%})")
    greedy = {name: side["greedy"]["tokens"] for name, side in sides.items() if "greedy" in side}
    if "ours bfloat16" in greedy and "transformers bfloat16" in greedy:
        a, b = greedy["ours bfloat16"], greedy["transformers bfloat16"]
        same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        print(f"  greedy continuation: ours bfloat16 and transformers agree on the first {same} of {len(a)} tokens")


def parse_args(argv: list[str] | None = None):
    parser = ArgumentParser(prog="python -m bench.real_size", description=__doc__.split("\n\n")[0])
    parser.add_argument("--work-dir", required=True, help="cache for the checkpoints and results (~24 GB at 28 layers)")
    parser.add_argument("--clean", action="store_true", help="delete --work-dir and exit")
    add_shape_flags(parser, hidden=4096, layers=28, heads=16, rotary_dim=64, vocab=50400)
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    parser.add_argument("--shard-gb", type=float, default=2.0, help="safetensors shard size, GiB")
    parser.add_argument("--formats", default="int8,bfloat16", help="our weight formats, comma-separated")
    parser.add_argument("--prompt", type=int, default=1919, help="prompt tokens (MLPerf GPT-J's input cap: 1919)")
    parser.add_argument("--new", type=int, default=32, help="timed decode steps (after 2 warm-up tokens)")
    parser.add_argument("--beams", type=int, default=4, help="beam search with this many beams (< 2: skip)")
    parser.add_argument("--beam-prompt", type=int, default=256,
                        help="prompt tokens for beam search (the beams' caches: 4 x 1,919 tokens in float32 "
                             "do not fit next to the int8 weights in 24 GB)")
    parser.add_argument("--quality-prompts", type=int, default=4, help="random prompts whose logits are compared")
    parser.add_argument("--quality-length", type=int, default=64, help="tokens per quality prompt")
    parser.add_argument("--load-from", choices=("converted", "hf"), default="converted",
                        help="our side loads the converted TF checkpoint or the safetensors directly")
    parser.add_argument("--bandwidth-gib", type=float, default=1.0, help="array size of the bandwidth step")
    parser.add_argument("--verbose", action="store_true", help="TensorFlow's start-up log in the steps")
    args = parser.parse_args(argv)
    args.formats = [f for f in args.formats.split(",") if f]
    from generation.config import WEIGHT_FORMATS
    if set(args.formats) - set(WEIGHT_FORMATS):
        parser.error(f"--formats: use some of {', '.join(WEIGHT_FORMATS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    work = os.path.abspath(args.work_dir)
    try:
        if args.clean:
            if os.path.isdir(work) and os.listdir(work) and not os.path.exists(os.path.join(work, WORK_MARKER)):
                raise WorkDirError(f"--work-dir {work} was not written by bench.real_size; not deleting it")
            shutil.rmtree(work, ignore_errors=True)
            print(f"deleted {work}")
            return 0
        claim_work_dir(work)
    except WorkDirError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from bench.machine import describe_machine
    print(describe_machine())
    base = os.path.join(work, shape_key(args))
    hf, converted, results = (os.path.join(base, name) for name in ("hf", "converted", "results"))
    print(f"checkpoint: {hf}", flush=True)
    info, reused = ensure_checkpoint(hf, args)
    os.makedirs(results, exist_ok=True)
    shared = ["--prompt", str(args.prompt), "--beam-prompt", str(args.beam_prompt), "--new", str(args.new),
              "--beams", str(args.beams), "--quality-prompts", str(args.quality_prompts),
              "--quality-length", str(args.quality_length)] + (["--verbose"] if args.verbose else [])
    steps = {"bandwidth": run_measured_step("bandwidth", results, "bandwidth", "--gib", str(args.bandwidth_gib))}
    shutil.rmtree(converted, ignore_errors=True)
    steps["convert_hf (bfloat16)"] = run_step(
        "convert", [sys.executable, "-m", "checkpoint_utils.convert_hf", "--source", hf, "--output-dir", converted,
                    "--dtype", "bfloat16", "--no-progress"])
    source = converted if args.load_from == "converted" else hf
    for weight_format in args.formats:
        logits = os.path.join(results, f"logits-ours-{weight_format}.npy")
        steps[f"ours {weight_format}"] = {**run_measured_step(
            f"ours-{weight_format}", results, "ours", "--source", source, "--format", weight_format,
            "--logits", logits, *shared), "logits": logits}
    logits = os.path.join(results, "logits-transformers.npy")
    steps["transformers bfloat16"] = {**run_measured_step(
        "transformers", results, "transformers", "--source", hf, "--logits", logits, *shared), "logits": logits}
    print_report(args, info, reused, steps)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
