"""Benchmark: LoRA training of a GPT-J-6B-shaped model on this machine (issue 22, item 6), ours
against transformers + PEFT on the same checkpoint.

    python -m bench.lora_real_size --work-dir /data/real_size                    # sequences 512 and 2048
    python -m bench.lora_real_size --work-dir /data/real_size --layers 2 --sequences 128   # quick

The checkpoint is bench.real_size's (the same --work-dir reuses it: GPT-J-6B-shaped, seeded random
weights, bfloat16 safetensors). Each run is its own process, so each has its own peak RSS
(wait4's maximum resident set):

  ours   run.py's training loop (runtime.estimator) on a repeated batch of one sequence: the base
         loaded leanly in bfloat16 (frozen), float32 adapters of --rank on --targets, bfloat16
         math, every block recomputed in the backward pass (runconfig.recompute_activations)
  peft   transformers' GPTJForCausalLM in bfloat16 with PEFT's LoRA (the same rank, alpha and
         targets, float32 adapters), gradient checkpointing, torch.autocast bfloat16, AdamW;
         at the sequences of --peft-sequences (its step costs what ours does: one at 2,048 is
         minutes)

Per run: seconds per step (steps after the first, which compiles), tokens/s, the loss of every
step (it must fall on a repeated batch), and for ours MFU: model FLOPs per token (runtime/
model_flops.py: 4 x base matmul parameters + 6 x adapter parameters + 12 x layers x hidden x
sequence; the recomputed forward is not counted) over the measured bfloat16 matmul peak.
Target: peak RSS <= 18 GB at sequence 2,048.
"""
from __future__ import annotations

import json
import os
import sys
import time

from bench.real_size import GIB, claim_work_dir, ensure_checkpoint, run_step, shape_key
from bench.shapes import add_shape_flags
from config.cli import ArgumentParser

TARGET_PEAK = 18e9


def run_side(side: str, hf: str, results: str, sequence: int, args) -> dict:
    result = os.path.join(results, f"lora-{side}-{sequence}.json")
    command = [sys.executable, "-m", "bench.lora_steps", side, "--source", hf, "--sequence", str(sequence),
               "--steps", str(args.steps), "--rank", str(args.rank), "--alpha", str(args.alpha),
               "--targets", args.targets, "--learning-rate", str(args.learning_rate), "--result", result]
    return run_step(f"{side} LoRA, sequence {sequence}", command, result)


def report(sequence: int, figures: dict) -> None:
    print(f"\nsequence {sequence}, batch 1:")
    print(f"  {'side':<8}{'peak RSS':>12}{'load s':>9}{'s/step':>9}{'tokens/s':>10}{'MFU':>8}  losses")
    for side, f in figures.items():
        if "error" in f or "seconds_per_step" not in f:
            print(f"  {side:<8} failed: {f.get('error')}")
            continue
        mfu = f"{100 * f['mfu']:.1f}%" if "mfu" in f else "-"
        losses = " ".join(f"{x:.4f}" for x in f["losses"])
        print(f"  {side:<8}{f['peak_rss'] / 1e9:>10.2f}GB{f['load_seconds']:>9.0f}{f['seconds_per_step']:>9.1f}"
              f"{f['tokens_per_second']:>10.1f}{mfu:>8}  {losses}")
    ours = figures.get("ours", {})
    if "mfu" in ours:
        print(f"  ours: {ours['achieved_flops'] / 1e9:.1f} GFLOP/s of model FLOPs ({ours['flops_per_token'] / 1e9:.2f} "
              f"GFLOP/token) against a measured bfloat16 matmul peak of {ours['matmul_peak_bfloat16'] / 1e9:.1f} GFLOP/s")
        falls = ours["losses"][-1] < ours["losses"][0]
        print(f"  ours: loss {'falls' if falls else 'DOES NOT FALL'} over {len(ours['losses'])} steps")
    if "seconds_per_step" in ours and "seconds_per_step" in figures.get("peft", {}):
        print(f"  speed ours / transformers+PEFT: {figures['peft']['seconds_per_step'] / ours['seconds_per_step']:.2f}x")
    if sequence == 2048 and "peak_rss" in ours:
        verdict = "meets" if ours["peak_rss"] <= TARGET_PEAK else "MISSES"
        print(f"  ours: peak RSS {ours['peak_rss'] / 1e9:.2f} GB {verdict} the 18 GB target")


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m bench.lora_real_size", description=__doc__.split("\n\n")[0])
    parser.add_argument("--work-dir", required=True, help="bench.real_size's cache (the checkpoint is built there if absent)")
    add_shape_flags(parser, hidden=4096, layers=28, heads=16, rotary_dim=64, vocab=50400)
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    parser.add_argument("--shard-gb", type=float, default=2.0, help="safetensors shard size, GiB")
    parser.add_argument("--sequences", default="512,2048", help="sequence lengths, comma-separated (batch 1)")
    parser.add_argument("--peft-sequences", default="512", help="sequences transformers + PEFT also runs ('' for none)")
    parser.add_argument("--steps", type=int, default=4, help="training steps per run (the first compiles)")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--alpha", type=float, default=32.0)
    parser.add_argument("--targets", default="q_proj,k_proj,v_proj,out_proj")
    parser.add_argument("--learning-rate", type=float, default=5e-3)
    args = parser.parse_args(argv)
    sequences = [int(s) for s in args.sequences.split(",") if s]
    peer = {int(s) for s in args.peft_sequences.split(",") if s}
    from bench.machine import describe_machine
    print(describe_machine())
    print(f"load average at start: {os.getloadavg()}")
    work = os.path.abspath(args.work_dir)
    claim_work_dir(work)
    base = os.path.join(work, shape_key(args))
    hf, results = os.path.join(base, "hf"), os.path.join(base, "results")
    info, reused = ensure_checkpoint(hf, args)
    os.makedirs(results, exist_ok=True)
    print(f"checkpoint: {hf} ({info['parameters']:,} parameters, {'reused' if reused else 'built'})", flush=True)
    every = {}
    for sequence in sequences:
        figures = {"ours": run_side("ours", hf, results, sequence, args)}
        if sequence in peer:
            figures["peft"] = run_side("peft", hf, results, sequence, args)
        report(sequence, figures)
        every[sequence] = figures
    print(f"\nload average at end: {os.getloadavg()}")
    with open(os.path.join(results, f"lora-{time.strftime('%Y%m%d-%H%M%S')}.json"), "w", encoding="utf-8") as f:
        json.dump(every, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
