"""Benchmark: training throughput of this runtime vs transformers' PyTorch GPT-J, same config.

    python -m bench.train [--hidden 512] [--layers 8] [--seq 256] [--batch 8] [--steps 8] [--no-xla]

Both sides train the same GPT-J shape with AdamW on the same fixed random batch (no input
pipeline: compute only), on this machine's CPU cores. Prints tokens/s for each, their ratio,
and model FLOPs utilisation against a square-matmul peak measured in the same run (the
higher of TensorFlow's and PyTorch's). Targets: >= 1.0x PyTorch tokens/s, >= 40% MFU.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time

from config.quiet import add_verbose_flag, quiet_tensorflow
from config.cli import ArgumentParser


def bench_ours(args, flops_per_token: float) -> tuple[float, list[float]]:
    import tensorflow as tf

    from runtime.estimator import Estimator
    from config.params import parse_params
    params = parse_params({
        "train_input": {"data_dir": "synthetic", "batch_size": args.batch, "max_sequence_length": args.seq},
        "model": model_section(args),
        "optimizer": {"optimizer_type": "adamw", "learning_rate": 1e-4, "weight_decay_rate": 0.01,
                      "max_gradient_norm": 1.0},
        "runconfig": {"max_steps": args.warmup + args.steps, "log_steps": 1000, "save_summary_steps": 1000,
                      "save_checkpoints_steps": 100000, "jit_compile": not args.no_xla},
    })
    rng = tf.random.Generator.from_seed(0)
    ids = rng.uniform([args.batch, args.seq + 1], 0, args.vocab, dtype=tf.int32)
    batch = ({"input_ids": ids[:, :-1], "input_mask": tf.ones([args.batch, args.seq], tf.int32)}, ids[:, 1:])

    def synthetic_input_fn(params, mode, input_context=None, data_position=0):
        return tf.data.Dataset.from_tensors(batch).repeat()

    model_dir = tempfile.mkdtemp(prefix="bench-train-")
    try:
        estimator = Estimator(params, model_dir, input_fn=synthetic_input_fn)
        times = {}
        estimator.train(on_step=lambda step, logs: times.__setitem__(step, (time.perf_counter(), logs["loss"])))
    finally:
        shutil.rmtree(model_dir, ignore_errors=True)
    first, last = args.warmup, args.warmup + args.steps
    seconds = times[last][0] - times[first][0]
    return args.batch * args.seq * args.steps / seconds, [times[s][1] for s in sorted(times)]


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
    for _ in range(args.warmup + args.steps):
        optimizer.zero_grad(set_to_none=True)
        logits = model(inputs).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, args.vocab), labels.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(float(loss.detach()))
        stamps.append(time.perf_counter())
    seconds = stamps[-1] - stamps[args.warmup - 1]
    return args.batch * args.seq * args.steps / seconds, losses


def torch_matmul_peak(size: int = 1024, seconds: float = 0.5) -> float:
    import torch
    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        torch.mm(a, b)
        count += 1
    return 2.0 * size ** 3 * count / (time.perf_counter() - start)


def model_section(args) -> dict:
    return {"vocab_size": args.vocab, "hidden_size": args.hidden, "num_hidden_layers": args.layers,
            "num_heads": args.heads, "rotary_dim": args.rotary_dim, "filter_size": 4 * args.hidden,
            "max_position_embeddings": max(2048, args.seq)}


def main() -> None:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=512, help="hidden size of the random model")
    parser.add_argument("--layers", type=int, default=8, help="layers of the random model")
    parser.add_argument("--heads", type=int, default=8, help="attention heads")
    parser.add_argument("--rotary-dim", type=int, default=16, help="rotary dimensions per head")
    parser.add_argument("--vocab", type=int, default=50400, help="vocabulary size")
    parser.add_argument("--seq", type=int, default=256, help="tokens per example")
    parser.add_argument("--batch", type=int, default=8, help="examples per step")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (tracing, compilation)")
    parser.add_argument("--steps", type=int, default=6, help="timed steps")
    parser.add_argument("--no-xla", action="store_true", help="run our step without XLA jit_compile")
    add_verbose_flag(parser)
    args = parser.parse_args()
    quiet_tensorflow(args.verbose)

    import torch

    from runtime.flops import measure_matmul_peak, training_flops_per_token
    from config.params import ModelParams
    from config.schema import from_dict
    torch.set_num_threads(os.cpu_count() or 1)
    flops_per_token = training_flops_per_token(from_dict(ModelParams, model_section(args), "model"), args.seq)
    peaks = {"tensorflow": measure_matmul_peak("float32"), "torch": torch_matmul_peak()}
    peak = max(peaks.values())
    ours, our_losses = bench_ours(args, flops_per_token)
    theirs, their_losses = bench_torch(args)
    print(f"\nGPT-J d={args.hidden} layers={args.layers} heads={args.heads} seq={args.seq} batch={args.batch} "
          f"vocab={args.vocab}, AdamW, fp32, {os.cpu_count()} CPU threads; "
          f"{flops_per_token / 1e6:.0f} MFLOP/token")
    print(f"matmul peak: TF {peaks['tensorflow'] / 1e9:.1f} GFLOP/s, torch {peaks['torch'] / 1e9:.1f} GFLOP/s")
    print(f"\n{'runtime':<36} {'tokens/s':>10} {'MFU':>7}  loss first -> last")
    for name, rate, losses in (("this project (TF" + ("" if args.no_xla else " + XLA") + ")", ours, our_losses),
                               ("transformers GPT-J (PyTorch)", theirs, their_losses)):
        print(f"{name:<36} {rate:>10,.0f} {rate * flops_per_token / peak:>7.1%}  "
              f"{losses[0]:.3f} -> {losses[-1]:.3f}")
    print(f"\nratio (ours / PyTorch): {ours / theirs:.2f}x (target >= 1.0); "
          f"MFU {ours * flops_per_token / peak:.1%} (target >= 40%)")


if __name__ == "__main__":
    main()
