"""Benchmark: convert a >= 1B-parameter HF GPT-J checkpoint; time and peak RSS.

    python -m bench.convert [--work-dir DIR] [--layers 20] [--hidden 2048] [--keep]

Builds a random GPT-J checkpoint (sharded safetensors, float32) itself, then runs
`checkpoint_utils.convert_hf` in a subprocess and reads its peak resident memory. As a peer it
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
import threading
import time
from typing import NamedTuple

import numpy as np

from config.quiet import add_verbose_flag, quiet_tensorflow
from config.cli import ArgumentParser

GB = 1 << 30


def gptj_hf_config(hidden: int, layers: int, vocab: int, heads: int, rotary_dim: int = 64, inner: int | None = None,
                   dtype: str = "float32") -> dict:
    """A transformers GPT-J config.json (untied head with bias, as GPT-J-6B)."""
    return dict(model_type="gptj", architectures=["GPTJForCausalLM"], vocab_size=vocab, n_embd=hidden,
                n_layer=layers, n_head=heads, rotary_dim=rotary_dim, n_inner=inner or 4 * hidden, n_positions=2048,
                activation_function="gelu_new", layer_norm_epsilon=1e-5, tie_word_embeddings=False,
                initializer_range=0.02, bos_token_id=50256, eos_token_id=50256, torch_dtype=dtype)


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


CHUNK_ELEMENTS = 1 << 24       # 64 MB of float32 drawn at a time


def random_tensor_chunks(name: str, shape: tuple[int, ...], dtype: np.dtype, seed: int, index: int):
    """A tensor's seeded random values in blocks of rows: HF's GPT-J initialisation (normal, std
    0.02), except LayerNorm weights 1 + N(0, 0.02) (activations keep their scale through the
    layers, and logits are random but not degenerate). Reproducible for (seed, index)."""
    rng = np.random.default_rng([seed, index])
    rows = max(1, CHUNK_ELEMENTS // max(1, int(np.prod(shape[1:]))))
    layer_norm_weight = ".ln_" in name and name.endswith(".weight")
    for start in range(0, shape[0], rows):
        block = rng.standard_normal((min(rows, shape[0] - start),) + tuple(shape[1:]), dtype=np.float32)
        block *= np.float32(0.02)
        if layer_norm_weight:
            block += np.float32(1.0)
        yield block.astype(dtype)


def make_checkpoint(directory: str, hidden: int, layers: int, vocab: int, shard_bytes: int, heads: int | None = None,
                    rotary_dim: int = 64, dtype: str = "float32", seed: int = 0) -> int:
    """Write a random GPT-J checkpoint (sharded safetensors in `dtype`, HF's file names and index)
    tensor by tensor, holding one chunk of one tensor at a time; returns its size in bytes."""
    from checkpoint_utils.safetensors_reader import DTYPES
    from checkpoint_utils.safetensors_writer import SafetensorsWriter, tensor_nbytes
    stored = DTYPES["BF16" if dtype == "bfloat16" else "F32"]
    inner = 4 * hidden
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(gptj_hf_config(hidden, layers, vocab, heads or hidden // 128, rotary_dim, inner, dtype), f, indent=2)
    shards: list[dict[str, tuple]] = [{}]
    for name, shape in gptj_tensor_shapes(hidden, layers, vocab, inner).items():
        if shards[-1] and sum(tensor_nbytes(s, stored) for s, _ in shards[-1].values()) \
                + tensor_nbytes(shape, stored) > shard_bytes:
            shards.append({})
        shards[-1][name] = (shape, stored)
    weight_map, index = {}, 0
    for number, tensors in enumerate(shards, 1):
        file = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        with SafetensorsWriter(os.path.join(directory, file), tensors, {"format": "pt"}) as writer:
            for name, (shape, _) in tensors.items():
                writer.write(name, random_tensor_chunks(name, shape, stored, seed, index))
                weight_map[name] = file
                index += 1
    size = sum(tensor_nbytes(shape, stored) for tensors in shards for shape, _ in tensors.values())
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": size}, "weight_map": weight_map}, f)
    return size


def run_measured(command: list[str]) -> tuple[float, int]:
    """(seconds, peak RSS bytes) of a subprocess that must succeed."""
    run = run_with_peak(command)
    if run.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed (exit {run.returncode}):\n{run.output}")
    return run.seconds, run.peak


def status_bytes(pid: int | str, field: str) -> int | None:
    """A memory field of /proc/<pid>/status (VmRSS, VmHWM, ...) in bytes; None once it is gone."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class MeasuredRun(NamedTuple):
    seconds: float
    peak: int                  # bytes
    output: str                # stdout and stderr
    returncode: int


def run_with_peak(command: list[str], env: dict | None = None) -> MeasuredRun:
    """Time, peak RSS and output of a subprocess, the peak separate for every child.

    wait4's ru_maxrss is the kernel's exact high-water mark, but Linux starts a child's at the
    parent's own (exec keeps the larger of the two), so it is the child's peak only when above the
    parent's. Otherwise the peak is the child's VmHWM (its own address space's high-water mark),
    read every 10 ms: exact except for growth in its last 10 ms."""
    parent_peak = status_bytes("self", "VmHWM") or 0
    start = time.time()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    output: list[str] = []
    reader = threading.Thread(target=lambda: output.append(process.stdout.read()))
    reader.start()
    sampled = 0
    while True:
        pid, status, usage = os.wait4(process.pid, os.WNOHANG)
        if pid:
            break
        sampled = max(sampled, status_bytes(process.pid, "VmHWM") or 0)
        time.sleep(0.01)
    seconds = time.time() - start
    reader.join()
    process.stdout.close()
    exact = usage.ru_maxrss * 1024                                  # KiB on Linux
    return MeasuredRun(seconds, exact if exact > parent_peak else sampled, "".join(output),
                       os.waitstatus_to_exitcode(status))


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
