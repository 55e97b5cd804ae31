"""Benchmark: weight-streaming execution.

    python -m bench.weight_streaming [--part a|b|both] [--work-dir DIR] [--keep]

(a) Step time of weight streaming (host_store: memory) beside standard execution, same model
    that fits, same batch, same compiler setting. Target: streaming <= 1.5x standard.
(b) host_store: disk: two training steps of a GPT-J-shaped model whose parameters plus Adam
    state are at least 1.5x this machine's RAM; prints the state size, time per step and the
    process's peak RSS. Target: peak RSS <= 25% of the state size. Needs free disk of about
    1.4x that state (parameters, two Adam slots, gradients).
"""
from __future__ import annotations

import math
import os
import shutil
import tempfile
import threading
import time

from config.quiet import add_verbose_flag, quiet_tensorflow
from config.cli import ArgumentParser

GiB = 1 << 30


def synthetic_input_fn(batch: int, seq: int, vocab: int):
    import tensorflow as tf
    ids = tf.random.stateless_uniform([batch, seq + 1], seed=[1, 2], minval=0, maxval=vocab, dtype=tf.int32)
    element = ({"input_ids": ids[:, :-1], "input_mask": tf.ones([batch, seq], tf.int32)}, ids[:, 1:])

    def input_fn(params, mode, input_context=None, data_position=0):
        return tf.data.Dataset.from_tensors(element).repeat()
    return input_fn


def make_params(model: dict, batch: int, seq: int, steps: int, runconfig: dict):
    from config.params import parse_params
    return parse_params({
        "train_input": {"data_dir": "synthetic", "batch_size": batch, "max_sequence_length": seq},
        "model": dict(model, max_position_embeddings=max(2048, seq)),
        "optimizer": {"optimizer_type": "adamw", "learning_rate": 1e-4, "weight_decay_rate": 0.01,
                      "max_gradient_norm": 1.0},
        "runconfig": dict({"max_steps": steps, "log_steps": 1, "save_summary_steps": 10000,
                           "save_checkpoints_steps": 100000}, **runconfig)})


def timed_steps(params, model_dir: str, input_fn) -> list[float]:
    """Wall time of each step (the first includes tracing)."""
    from runtime.estimator import Estimator
    estimator = Estimator(params, model_dir, input_fn=input_fn)
    stamps = [time.perf_counter()]
    estimator.train(on_step=lambda step, logs: stamps.append(time.perf_counter()))
    return [b - a for a, b in zip(stamps, stamps[1:])]


def part_a(work: str) -> None:
    model = {"vocab_size": 8192, "hidden_size": 512, "num_hidden_layers": 8, "num_heads": 8, "rotary_dim": 16,
             "filter_size": 2048}
    batch, seq, steps = 8, 256, 6
    input_fn = synthetic_input_fn(batch, seq, model["vocab_size"])
    rows = []
    for execution in ("standard", "weight_streaming"):
        params = make_params(model, batch, seq, steps, {"execution": execution})
        times = timed_steps(params, os.path.join(work, f"a_{execution}"), input_fn)
        rows.append((execution, sum(times[2:]) / len(times[2:])))
    print(f"\n(a) GPT-J d=512, 8 layers, vocab 8192, batch {batch} x seq {seq}, AdamW, fp32, no XLA")
    for name, seconds in rows:
        print(f"    {name:<18} {seconds:7.3f} s/step")
    ratio = rows[1][1] / rows[0][1]
    print(f"    weight streaming / standard: {ratio:.2f}x (target <= 1.5x)")


def part_b(work: str, layers: int | None) -> None:
    import psutil
    from model import weight_shapes
    from config.schema import from_dict
    from config.params import ModelParams
    ram = psutil.virtual_memory().total
    hidden, vocab = 3072, 50400
    model = {"vocab_size": vocab, "hidden_size": hidden, "num_heads": 24, "rotary_dim": 32,
             "filter_size": 4 * hidden}

    def state_bytes(n_layers):
        config = from_dict(ModelParams, dict(model, num_hidden_layers=n_layers, max_position_embeddings=2048),
                           "model")
        return 12 * sum(math.prod(s) for s in weight_shapes(config).values())

    n_layers = layers or next(n for n in range(1, 200) if state_bytes(n) >= 1.5 * ram)
    state = state_bytes(n_layers)
    free = shutil.disk_usage(work).free
    if free < state * 1.4:
        raise SystemExit(f"(b) needs {state * 1.4 / GiB:.0f} GiB free under {work}, has {free / GiB:.0f} GiB")
    model["num_hidden_layers"] = n_layers
    batch, seq = 1, 64
    params = make_params(model, batch, seq, 2, {"execution": "weight_streaming",
                                                "weight_streaming": {"host_store": "disk"}})
    peak = {"rss": 0}
    done = threading.Event()

    def sample():
        process = psutil.Process()
        while not done.is_set():
            peak["rss"] = max(peak["rss"], process.memory_info().rss)
            time.sleep(0.05)

    threading.Thread(target=sample, daemon=True).start()
    start = time.perf_counter()
    from runtime.estimator import Estimator
    estimator = Estimator(params, os.path.join(work, "b"), input_fn=synthetic_input_fn(batch, seq, vocab))
    estimator.restore()  # creates the store: the initial weights, drawn tensor by tensor
    created = time.perf_counter() - start
    # Not measured: the final checkpoint (model + Adam state in TF's format) would need another
    # state-sized stretch of disk; the steps are what this part measures.
    estimator.save = lambda: None
    stamps = [time.perf_counter()]
    estimator.train(on_step=lambda step, logs: stamps.append(time.perf_counter()))
    done.set()
    steps = [b - a for a, b in zip(stamps, stamps[1:])]
    print(f"\n(b) host_store: disk, GPT-J shape d={hidden}, {n_layers} layers, vocab {vocab}: "
          f"{state / 12 / 1e9:.2f} B parameters; parameters + Adam state {state / GiB:.1f} GiB = "
          f"{state / ram:.2f}x RAM ({ram / GiB:.0f} GiB)")
    print(f"    store created in {created:.0f}s; steps: {', '.join(f'{s:.0f}s' for s in steps)} "
          f"(batch {batch} x seq {seq})")
    print(f"    peak RSS {peak['rss'] / GiB:.2f} GiB = {peak['rss'] / state:.1%} of the state (target <= 25%)")


def main() -> None:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=("a", "b", "both"), default="both", help="which measurement to run (see the module docstring)")
    parser.add_argument("--work-dir", default=None, help="where to build (default: a temp dir)")
    parser.add_argument("--layers", type=int, default=None, help="(b) layer count; default: the smallest "
                                                                 "whose state is >= 1.5x RAM")
    parser.add_argument("--keep", action="store_true", help="keep the work dir")
    add_verbose_flag(parser)
    args = parser.parse_args()
    quiet_tensorflow(args.verbose)
    work = args.work_dir or tempfile.mkdtemp(prefix="bench-ws-")
    os.makedirs(work, exist_ok=True)
    try:
        if args.part in ("a", "both"):
            part_a(work)
        if args.part in ("b", "both"):
            part_b(work, args.layers)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
