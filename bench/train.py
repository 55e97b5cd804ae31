"""Benchmark: training throughput of this runtime vs transformers' PyTorch GPT-J, same config.

    python -m bench.train [--dtype float32|bfloat16] [--compile auto|xla|graph]
                          [--hidden 512] [--layers 8] [--seq 256] [--batch 8] [--steps 6]

Both sides train the same GPT-J shape with AdamW on the same fixed random batch (no input
pipeline: compute only), on this machine's CPU cores. `--dtype bfloat16` is mixed precision
on both sides: our `model.mixed_precision` (float32 variables, bfloat16 math) against the
same model under `torch.autocast(bfloat16)`. Prints the machine, tokens/s for each side,
their ratio, and model FLOPs utilisation against the square-matmul peak of the same dtype
measured in the same run (the higher of TensorFlow's and PyTorch's). Targets: float32
>= 1.2x PyTorch; bfloat16 >= 1.5x PyTorch and >= 40% MFU.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time

from config.quiet import add_verbose_flag, quiet_tensorflow
from bench.shapes import add_shape_flags
from config.cli import ArgumentParser


JIT_SETTINGS = {"auto": "auto", "xla": True, "graph": False}


def bench_ours(args) -> tuple[float, list[float], str]:
    import tensorflow as tf

    from runtime.estimator import Estimator
    from config.params import parse_params
    params = parse_params({
        "train_input": {"data_dir": "synthetic", "batch_size": args.batch, "max_sequence_length": args.seq},
        "model": model_section(args),
        "optimizer": {"optimizer_type": "adamw", "learning_rate": 1e-4, "weight_decay_rate": 0.01,
                      "max_gradient_norm": 1.0},
        "runconfig": {"max_steps": args.warmup + args.steps, "log_steps": 1000, "save_summary_steps": 1000,
                      "save_checkpoints_steps": 100000, "jit_compile": JIT_SETTINGS[args.compile]},
    })
    rng = tf.random.Generator.from_seed(0)
    ids = rng.uniform([args.batch, args.seq + 1], 0, args.vocab, dtype=tf.int32)
    batch = ({"input_ids": ids[:, :-1], "input_mask": tf.ones([args.batch, args.seq], tf.int32)}, ids[:, 1:])

    def synthetic_input_fn(params, mode, input_context=None, data_position=0):
        return tf.data.Dataset.from_tensors(batch).repeat()

    model_dir = tempfile.mkdtemp(prefix="bench-train-")
    try:
        estimator = Estimator(params, model_dir, input_fn=synthetic_input_fn)
        path = estimator.execution.compile_path.name
        times = {}
        estimator.train(on_step=lambda step, logs: times.__setitem__(step, (time.perf_counter(), logs["loss"])))
    finally:
        shutil.rmtree(model_dir, ignore_errors=True)
    first, last = args.warmup, args.warmup + args.steps
    seconds = times[last][0] - times[first][0]
    return args.batch * args.seq * args.steps / seconds, [times[s][1] for s in sorted(times)], path


def bench_torch(args) -> tuple[float, list[float]]:
    import torch
    import transformers
    torch.manual_seed(0)
    config = transformers.GPTJConfig(vocab_size=args.vocab, n_embd=args.hidden, n_layer=args.layers,
                                     n_head=args.heads, rotary_dim=args.rotary_dim, n_inner=4 * args.hidden,
                                     n_positions=max(2048, args.seq), bos_token_id=0, eos_token_id=0)
    model = transformers.GPTJForCausalLM(config).train()
    decay = [p for n, p in model.named_parameters() if p.ndim > 1]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=1e-4)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq + 1))
    inputs, labels = ids[:, :-1], ids[:, 1:]
    losses, stamps = [], []
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.dtype == "bfloat16")
    for _ in range(args.warmup + args.steps):
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            logits = model(inputs).logits
        loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, args.vocab), labels.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(float(loss.detach()))
        stamps.append(time.perf_counter())
    seconds = stamps[-1] - stamps[args.warmup - 1]
    return args.batch * args.seq * args.steps / seconds, losses


def torch_matmul_peak(dtype: str, size: int = 1024, seconds: float = 0.5) -> float:
    import torch
    a, b = (torch.randn(size, size).to(getattr(torch, dtype)) for _ in range(2))
    torch.mm(a, b)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        torch.mm(a, b)
        count += 1
    return 2.0 * size ** 3 * count / (time.perf_counter() - start)


def model_section(args) -> dict:
    return {"vocab_size": args.vocab, "hidden_size": args.hidden, "num_hidden_layers": args.layers,
            "num_heads": args.heads, "rotary_dim": args.rotary_dim, "filter_size": 4 * args.hidden,
            "max_position_embeddings": max(2048, args.seq),
            "mixed_precision": args.dtype != "float32", "mixed_precision_dtype": "bfloat16"}


def main() -> None:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    add_shape_flags(parser)
    parser.add_argument("--seq", type=int, default=256, help="tokens per example")
    parser.add_argument("--batch", type=int, default=8, help="examples per step")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (tracing, compilation)")
    parser.add_argument("--steps", type=int, default=6, help="timed steps")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                        help="compute dtype of both sides (bfloat16: mixed precision, float32 variables)")
    parser.add_argument("--compile", default="auto", choices=tuple(JIT_SETTINGS),
                        help="our compile path: auto (the runtime's choice per dtype and device), xla or graph")
    add_verbose_flag(parser)
    args = parser.parse_args()
    quiet_tensorflow(args.verbose)

    import torch

    from bench.machine import describe_machine
    from runtime.flops import measure_matmul_peak, training_flops_per_token
    from config.params import ModelParams
    from config.schema import from_dict
    torch.set_num_threads(os.cpu_count() or 1)
    print(describe_machine())
    flops_per_token = training_flops_per_token(from_dict(ModelParams, model_section(args), "model"), args.seq)
    peaks = {"tensorflow": measure_matmul_peak(args.dtype), "torch": torch_matmul_peak(args.dtype)}
    peak = max(peaks.values())
    ours, our_losses, path = bench_ours(args)
    theirs, their_losses = bench_torch(args)
    precision = "fp32" if args.dtype == "float32" else "bf16 mixed precision"
    their_name = "transformers GPT-J (PyTorch" + (", autocast bf16)" if args.dtype == "bfloat16" else ")")
    target = 1.2 if args.dtype == "float32" else 1.5
    print(f"\nGPT-J d={args.hidden} layers={args.layers} heads={args.heads} seq={args.seq} batch={args.batch} "
          f"vocab={args.vocab}, AdamW, {precision}, {os.cpu_count()} CPU threads; "
          f"{flops_per_token / 1e6:.0f} MFLOP/token")
    print(f"{args.dtype} matmul peak: TF {peaks['tensorflow'] / 1e9:.1f} GFLOP/s, "
          f"torch {peaks['torch'] / 1e9:.1f} GFLOP/s")
    print(f"\n{'runtime':<44} {'tokens/s':>10} {'MFU':>7}  loss first -> last")
    for name, rate, losses in ((f"this project (TF, {path})", ours, our_losses),
                               (their_name, theirs, their_losses)):
        print(f"{name:<44} {rate:>10,.0f} {rate * flops_per_token / peak:>7.1%}  "
              f"{losses[0]:.3f} -> {losses[-1]:.3f}")
    print(f"\nratio (ours / PyTorch): {ours / theirs:.2f}x (target >= {target}); "
          f"MFU {ours * flops_per_token / peak:.1%} of the {args.dtype} peak"
          + (" (target >= 40%)" if args.dtype == "bfloat16" else ""))


if __name__ == "__main__":
    main()
