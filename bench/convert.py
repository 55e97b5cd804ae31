"""Benchmark: convert a >= 1B-parameter HF GPT-J checkpoint; time and peak RSS.

    python -m bench.convert [--work-dir DIR] [--layers 20] [--hidden 2048] [--keep]

Builds a random GPT-J checkpoint (sharded safetensors, float32) itself, then runs
`checkpoint_utils.convert_hf` in a subprocess and samples its resident memory. As a peer it
measures, in the same run, the naive path (every tensor loaded at once with
`safetensors.numpy.load_file`, as a whole-model loader does). Target: converter peak RSS
below 40% of the checkpoint size.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import psutil
from safetensors.numpy import save_file

from config.quiet import add_verbose_flag, quiet_tensorflow
from config.cli import ArgumentParser

GB = 1 << 30


def gptj_tensor_shapes(hidden: int, layers: int, vocab: int, inner: int) -> dict[str, tuple[int, ...]]:
    shapes = {"transformer.wte.weight": (vocab, hidden), "lm_head.weight": (vocab, hidden),
              "lm_head.bias": (vocab,), "transformer.ln_f.weight": (hidden,),
              "transformer.ln_f.bias": (hidden,)}
    for i in range(layers):
        p = f"transformer.h.{i}"
        shapes.update({f"{p}.ln_1.weight": (hidden,), f"{p}.ln_1.bias": (hidden,),
                       f"{p}.mlp.fc_in.weight": (inner, hidden), f"{p}.mlp.fc_in.bias": (inner,),
                       f"{p}.mlp.fc_out.weight": (hidden, inner), f"{p}.mlp.fc_out.bias": (hidden,)})
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            shapes[f"{p}.attn.{name}.weight"] = (hidden, hidden)
    return shapes


def make_checkpoint(directory: str, hidden: int, layers: int, vocab: int, shard_bytes: int) -> int:
    """Write a random GPT-J checkpoint; returns its size in bytes."""
    inner = 4 * hidden
    config = dict(model_type="gptj", architectures=["GPTJForCausalLM"], vocab_size=vocab, n_embd=hidden,
                  n_layer=layers, n_head=hidden // 128, rotary_dim=64, n_inner=inner, n_positions=2048,
                  activation_function="gelu_new", layer_norm_epsilon=1e-5, tie_word_embeddings=False)
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config, f)
    rng = np.random.default_rng(0)
    shard: dict[str, np.ndarray] = {}
    weight_map, files, size = {}, [], 0

    def flush():
        nonlocal shard
        if shard:
            name = f"model-{len(files) + 1:05d}.safetensors"
            save_file(shard, os.path.join(directory, name), metadata={"format": "pt"})
            files.append(name)
            weight_map.update({k: name for k in shard})
        shard = {}

    for name, shape in gptj_tensor_shapes(hidden, layers, vocab, inner).items():
        array = rng.standard_normal(shape, dtype=np.float32) * 0.02
        if sum(a.nbytes for a in shard.values()) + array.nbytes > shard_bytes:
            flush()
        shard[name] = array
        size += array.nbytes
    flush()
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": size}, "weight_map": weight_map}, f)
    return size


def run_measured(command: list[str]) -> tuple[float, int]:
    """(seconds, peak RSS bytes) of a subprocess, sampled every 20 ms."""
    start = time.time()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    watched = psutil.Process(process.pid)
    peak = 0
    while process.poll() is None:
        try:
            peak = max(peak, watched.memory_info().rss)
        except psutil.NoSuchProcess:
            break
        time.sleep(0.02)
    output = process.stdout.read()
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{output}")
    return time.time() - start, peak


NAIVE_LOAD = """
import glob, sys
from safetensors.numpy import load_file
tensors = {}
for path in sorted(glob.glob(sys.argv[1] + '/*.safetensors')):
    tensors.update(load_file(path))
print(sum(t.nbytes for t in tensors.values()))
"""


def main() -> None:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work-dir", default=None, help="where to build (default: a temp dir)")
    parser.add_argument("--hidden", type=int, default=2048, help="hidden size of the random GPT-J")
    parser.add_argument("--layers", type=int, default=20, help="layers of the random GPT-J")
    parser.add_argument("--vocab", type=int, default=50400, help="vocabulary of the random GPT-J")
    parser.add_argument("--shard-gb", type=float, default=2.0, help="source shard size")
    parser.add_argument("--skip-peer", action="store_true", help="skip the naive whole-model load")
    parser.add_argument("--keep", action="store_true", help="keep the work dir")
    add_verbose_flag(parser)
    args = parser.parse_args()
    quiet_tensorflow(args.verbose)
    from bench.machine import describe_machine
    print(describe_machine())
    work = args.work_dir or tempfile.mkdtemp(prefix="bench-convert-")
    source, output = os.path.join(work, "hf"), os.path.join(work, "tf")
    shutil.rmtree(output, ignore_errors=True)
    try:
        t0 = time.time()
        size = make_checkpoint(source, args.hidden, args.layers, args.vocab, int(args.shard_gb * GB))
        n_params = size // 4
        print(f"source: random GPT-J, {n_params / 1e9:.2f}B parameters, {size / GB:.2f} GiB float32 "
              f"(built in {time.time() - t0:.0f}s)")
        seconds, peak = run_measured([sys.executable, "-m", "checkpoint_utils.convert_hf", "--source", source,
                                      "--output-dir", output, "--no-progress"])
        baseline_s, baseline_rss = run_measured([sys.executable, "-c", "import tensorflow"])
        rows = [("convert_hf (this project)", seconds, peak)]
        if not args.skip_peer:
            peer_s, peer_rss = run_measured([sys.executable, "-c", NAIVE_LOAD, source])
            rows.append(("naive whole-model load (peer)", peer_s, peer_rss))
        rows.append(("python + import tensorflow (floor)", baseline_s, baseline_rss))
        print(f"\n{'run':<36} {'time s':>8} {'peak RSS GiB':>13} {'RSS / ckpt':>11}")
        for name, s, rss in rows:
            print(f"{name:<36} {s:>8.1f} {rss / GB:>13.2f} {rss / size:>10.1%}")
        print(f"\nconvert throughput: {size / GB / seconds:.2f} GiB/s; "
              f"peak RSS {peak / size:.1%} of the checkpoint (target < 40%): "
              f"{'PASS' if peak < 0.4 * size else 'FAIL'}")
        if not args.skip_peer:
            print(f"peak RSS vs naive load: {peak / rows[1][2]:.2f}x")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
