"""The memory preflight (runtime/preflight.py) and the estimates it reads (runtime/peak_memory.py
over runtime/memory_model.py): the limits read from fake /proc and cgroup trees, the one refusal
line, the model's counts against independent ones, commands refused before they build anything
(GPT-J-6B in float32 among them), and estimates against the measured peaks of real commands."""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time

import pytest
import yaml

from config.params import ModelParams, load_params
from runtime import memory_model, peak_memory, preflight
from runtime.peak_memory import Decoding, Estimate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GPTJ_6B = os.path.join(ROOT, "configs", "params_gptj_6B.yaml")
GiB = 1 << 30
MiB = 1 << 20
TINY = ModelParams(vocab_size=320, hidden_size=32, num_hidden_layers=2, num_heads=4, rotary_dim=4, filter_size=128,
                   max_position_embeddings=2048)


def fake_tree(root, files: dict[str, str]) -> str:
    for path, text in files.items():
        full = os.path.join(root, path)
        os.makedirs(os.path.dirname(full), exist_ok=True)
        with open(full, "w") as f:
            f.write(text)
    return str(root)


def proc(cgroup: str, mountinfo: str, available_kib: int = 20 * 1024 * 1024, rss_kib: int = 100 * 1024) -> dict:
    return {"proc/self/cgroup": cgroup, "proc/self/mountinfo": mountinfo,
            "proc/meminfo": f"MemTotal:       24683784 kB\nMemFree:  1 kB\nMemAvailable:   {available_kib} kB\n",
            "proc/self/status": f"Name:\tpython\nVmHWM:\t  900000 kB\nVmRSS:\t  {rss_kib} kB\n"}


# ---- what this process may use ----------------------------------------------------------------

def test_cgroup_v2_takes_the_tightest_of_its_own_and_parent_limits_less_reclaimable_cache(tmp_path):
    base = "sys/fs/cgroup"
    root = fake_tree(tmp_path, {
        **proc("0::/user.slice/job.scope\n", "30 1 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n"),
        f"{base}/user.slice/job.scope/memory.max": f"{8 * GiB}\n",
        f"{base}/user.slice/job.scope/memory.current": f"{3 * GiB}\n",
        f"{base}/user.slice/job.scope/memory.stat": f"anon {2 * GiB}\ninactive_file {GiB}\nactive_file 5\n",
        f"{base}/user.slice/memory.max": f"{6 * GiB}\n",
        f"{base}/user.slice/memory.current": f"{5 * GiB}\n",
        f"{base}/user.slice/memory.stat": "inactive_file 0\n",
        f"{base}/memory.current": f"{9 * GiB}\n",            # the root cgroup has no memory.max
    })
    # own: 8 - (3 - 1 cache) = 6 GiB; parent: 6 - 5 = 1 GiB; MemAvailable 20 GiB; plus own RSS
    assert preflight.cgroup_room(root) == (GiB, "/user.slice")
    available = preflight.available_memory(root)
    assert available.bytes == GiB + 100 * MiB
    assert "/user.slice" in available.source


def test_cgroup_v1_memory_controller_beside_a_v2_mount(tmp_path):
    """The layout of this project's own machines: v1 controllers plus an empty unified hierarchy."""
    mounts = ("35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory\n"
              "41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n"
              "32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu\n")
    base = "sys/fs/cgroup/memory"
    root = fake_tree(tmp_path, {
        **proc("4:memory:/process_api/abc\n1:cpu:/\n0::/\n", mounts, available_kib=10 * 1024 * 1024),
        f"{base}/process_api/abc/memory.limit_in_bytes": f"{4 * GiB}\n",
        f"{base}/process_api/abc/memory.usage_in_bytes": f"{GiB}\n",
        f"{base}/process_api/abc/memory.stat": f"cache 1\ntotal_inactive_file {GiB // 2}\n",
        f"{base}/process_api/memory.limit_in_bytes": "9223372036854771712\n",      # v1's "no limit"
        f"{base}/memory.limit_in_bytes": "9223372036854771712\n",
    })
    assert preflight.cgroup_room(root) == (3 * GiB + GiB // 2, "/process_api/abc")
    assert preflight.available_memory(root).bytes == 3.5 * GiB + 100 * MiB


def test_without_a_cgroup_limit_meminfo_decides_and_without_either_nothing_is_refused(tmp_path):
    # a container without a cgroup namespace: the mount shows its own subtree as the root
    root = fake_tree(tmp_path / "container", {
        **proc("9:memory:/docker/xyz\n", "35 31 0:32 /docker/xyz /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n",
               available_kib=5 * 1024 * 1024),
        "sys/fs/cgroup/memory/memory.limit_in_bytes": "9223372036854771712\n",
        "sys/fs/cgroup/memory/memory.usage_in_bytes": f"{GiB}\n",
    })
    assert preflight.cgroup_room(root) is None
    assert preflight.available_memory(root) == preflight.Available(5 * GiB + 100 * MiB, "MemAvailable")
    nothing = preflight.available_memory(str(tmp_path / "empty"))
    assert nothing.bytes == float("inf")
    preflight.check(Estimate("x", (("weights", 1e15),)), skip=False, available=nothing)


# ---- the refusal -------------------------------------------------------------------------------

def test_refusal_is_one_line_with_the_terms_the_availability_and_the_first_fitting_fix_per_flag():
    estimate = Estimate("run.py --mode predict", (("float32 weights", 24 * GiB), ("KV cache", 2 * GiB),
                                                  ("TensorFlow runtime", 0.5 * GiB)),
                        fixes=(("--weight-format bfloat16", 14 * GiB), ("--weight-format int8", 8 * GiB),
                               ("--batch-size 4", 25.5 * GiB), ("--batch-size 2", 25.4 * GiB)),
                        plan="python -m bench.plan --params P")
    available = preflight.Available(10 * GiB, "MemAvailable")
    with pytest.raises(preflight.NotEnoughMemoryError) as caught:
        preflight.check(estimate, skip=False, available=available)
    line = str(caught.value)
    assert "\n" not in line
    assert line.startswith("run.py --mode predict needs ~26.5 GiB of memory at its peak (float32 weights 24.0 GiB, "
                           "KV cache 2.0 GiB, TensorFlow runtime 512 MiB) but 10.0 GiB is available (MemAvailable)")
    # bfloat16 (14 GiB) does not fit, int8 (8 GiB) does; neither batch size fits
    assert "it fits with --weight-format int8 (~8.0 GiB); size a run with python -m bench.plan --params P" in line
    assert "--batch-size" not in line and line.endswith("--skip-memory-check runs it anyway")
    nothing_fits = preflight.refusal(dataclasses.replace(estimate, fixes=estimate.fixes[2:]), available)
    assert "even with --batch-size 2 it needs ~25.4 GiB" in nothing_fits
    preflight.check(estimate, skip=True, available=available)                           # --skip-memory-check
    preflight.check(estimate, skip=False, available=preflight.Available(27 * GiB, "MemAvailable"))


# ---- the memory model against independent counts ------------------------------------------------

def test_gptj_6b_cache_per_slot_and_weight_formats():
    """GPT-J-6B's key/value cache per slot of 2,048 tokens is 2 (keys, values) x 28 layers x
    2,048 x 4,096 x bytes; its int8 weights are the kernels' bytes, a float32 scale per output
    column and everything else in float32; its bfloat16 weights hold the token table in bfloat16
    too; counted here from the published shapes."""
    model = load_params(GPTJ_6B).model
    for dtype_bytes in (2, 4):
        assert memory_model.kv_cache_bytes(model, 1, 2048, dtype_bytes) == 2 * 28 * 2048 * 4096 * dtype_bytes
    d, f, v, layers = 4096, 16384, 50400, 28
    kernels = layers * (4 * d * d + 2 * d * f) + d * v                      # q, k, v, out, fc_in, fc_out; LM head
    columns = layers * (4 * d + f + d) + v                                  # one int8 scale per output column
    rest = 6_050_882_784 - kernels                                          # embedding, LayerNorms, biases
    assert memory_model.format_weight_bytes(model, "float32") == 4 * 6_050_882_784
    assert memory_model.format_weight_bytes(model, "bfloat16") == 2 * kernels + 2 * v * d + 4 * (rest - v * d)
    assert memory_model.format_weight_bytes(model, "int8") == kernels + 4 * columns + 4 * rest


@pytest.mark.parametrize("variant", ["gptj", "neox", "tied"])
def test_format_bytes_equal_the_packed_generation_weights(variant):
    from generation.weights import GenerationModel
    from model import GPTJModel
    config = {"gptj": TINY, "tied": dataclasses.replace(TINY, share_embedding_weights=True),
              "neox": dataclasses.replace(TINY, rotary_style="neox", use_untied_layer_norm=True,
                                          use_projection_bias_in_attention=True, use_attention_output_bias=True,
                                          use_bias_in_output=False)}[variant]
    model = GPTJModel(config)
    for weight_format in ("bfloat16", "int8"):
        assert memory_model.format_weight_bytes(config, weight_format) == \
            GenerationModel(model, weight_format).weight_bytes, weight_format


def test_serving_refuses_a_max_batch_whose_cache_does_not_fit_and_names_the_largest_that_does():
    from serving.server import Limits, memory_estimate
    limits = Limits(max_prompt_tokens=512, max_tokens=256)
    available = preflight.Available(8 * GiB, "MemAvailable")
    estimate = memory_estimate(TINY, limits, 1 << 20, "float32", "xla")
    per_slot = memory_model.kv_cache_bytes(TINY, 1, 768, 4)                   # L = 512 + 256
    # + a 4-beam sampling request through the Generator: its cache in, in its loop, and gathered
    assert dict(estimate.terms)["KV cache"] == (1 << 20) * per_slot + 3 * 4 * per_slot
    with pytest.raises(preflight.NotEnoughMemoryError) as caught:
        preflight.check(estimate, skip=False, available=available)
    fitting = [n for n in (1 << k for k in range(20)) if memory_estimate(TINY, limits, n, "float32", "xla").total
               <= available.bytes]
    assert f"it fits with --max-batch {max(fitting)} (" in str(caught.value)
    assert memory_estimate(TINY, limits, 2 * max(fitting), "float32", "xla").total > available.bytes


def test_the_serving_estimate_counts_the_larger_whole_request_beams_or_samples():
    """A whole request beside the slots is a beam search (k rows, three caches while its step
    reorders them) or max_n sampled rows (two caches): the estimate counts the larger, not
    three caches of max(k, n) rows."""
    from serving.server import Limits, memory_estimate
    per_slot = memory_model.kv_cache_bytes(TINY, 1, 768, 4)                   # L = 512 + 256

    def whole_rows(**limits) -> float:
        kv = dict(memory_estimate(TINY, Limits(max_prompt_tokens=512, max_tokens=256, **limits), 2, "float32",
                                  "xla").terms)["KV cache"]
        return (kv - 2 * per_slot) / per_slot
    assert whole_rows(max_beams=4, max_n=4) == 3 * 4
    assert whole_rows(max_beams=4, max_n=6) == 3 * 4        # 12 >= 2 x 6
    assert whole_rows(max_beams=4, max_n=16) == 2 * 16
    assert whole_rows(max_beams=1, max_n=4) == 2 * 4


# ---- commands refused before they build anything -------------------------------------------------

def run_python(code: str, timeout: float = 120) -> tuple[subprocess.CompletedProcess, float]:
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": ROOT})
    return done, time.monotonic() - start


def test_gptj_6b_float32_predict_and_train_are_refused_in_seconds_before_tensorflow_loads(tmp_path):
    """The acceptance test: GPT-J-6B predicts in float32 with ~45 GiB (its float32 weights and the
    checkpoint restore's copy): refused with one line, exit code 2, no weights needed (the model
    directory is empty: the refusal comes first) and TensorFlow never imported."""
    from tests.data_helpers import make_tiny_tokenizer
    estimate = peak_memory.generation_estimate("run.py --mode predict", load_params(GPTJ_6B).model, "float32",
                                                lambda count: Decoding(count, 64, 32, count))
    if preflight.available_memory().bytes >= estimate.total:
        pytest.skip(f"this machine has {preflight.available_memory().bytes / GiB:.0f} GiB available: 6B fits")
    make_tiny_tokenizer(str(tmp_path / "tok"))
    model_dir = tmp_path / "empty"
    model_dir.mkdir()
    for mode, extra in (("predict", ["--tokenizer", str(tmp_path / "tok"), "--prompt", "The cat",
                                     "--weight-format", "float32"]), ("train", [])):
        argv = ["--mode", mode, "--params", GPTJ_6B, "--model-dir", str(model_dir)] + extra
        done, seconds = run_python(f"import sys, run\ncode = run.main({argv!r})\n"
                                   "assert 'tensorflow' not in sys.modules\nsys.exit(code)")
        assert done.returncode == 2, done.stderr
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: run.py --mode {mode} needs ~"), done.stderr
        assert "--skip-memory-check" in lines[0] and seconds < 30
        assert os.listdir(model_dir) == []                  # nothing written


def test_server_refuses_its_max_batch_and_skip_memory_check_goes_on_to_load(tmp_path, capsys):
    """serving.server on a tiny model: a --max-batch whose cache needs petabytes is refused with the
    largest that fits; with --skip-memory-check it goes on to load (and stops there: no checkpoint)."""
    from serving import server
    from tests.data_helpers import make_tiny_tokenizer
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"model": dataclasses.asdict(TINY)}))
    make_tiny_tokenizer(str(tmp_path / "tok"))
    (tmp_path / "run").mkdir()
    argv = ["--params", str(params), "--model-dir", str(tmp_path / "run"), "--tokenizer", str(tmp_path / "tok"),
            "--max-batch", str(1 << 40)]
    assert server.main(argv) == 2
    line = capsys.readouterr().err.strip()
    assert line.startswith("error: serving.server needs ~") and "it fits with --max-batch " in line, line
    assert server.main(argv + ["--skip-memory-check"]) == 2
    line = capsys.readouterr().err.strip()
    assert line.startswith("error:") and "needs ~" not in line and "checkpoint" in line, line


# ---- estimates against measured peaks ------------------------------------------------------------
#
# A model of 53.5 M parameters (204 MiB in float32; most of them in the token table and the LM
# head, vocabulary 49,152, so that one block compiles quickly) trained for one step (AdamW,
# clipping, XLA), then predicting in float32 and int8, each command in a process of its own whose
# peak resident set the kernel reports (the child's own high-water mark). What the estimate does not count, and
# so the margin it is allowed: an under-estimate of up to 15% of the peak covers the
# initialisation's slack (drawing a model's weights left 130 MiB above its 352 MiB) and whether
# glibc's per-thread arenas happen to reuse a freed buffer; an over-estimate of up to 25% covers
# compiled buffers XLA fuses or reuses on one CPU kind and not another (the prefill's
# temporaries, a cache copy) and the compile workspaces fitted to 1-12 blocks. Outside that band
# the preflight would refuse commands that fit, or pass ones that do not. docs/runtime.md has
# the wider table (bfloat16, resumed training, SGD, mixed precision, other shapes).
UNDER, OVER = 0.85, 1.25
MEASURED_MODEL = {"vocab_size": 49152, "hidden_size": 512, "num_hidden_layers": 1, "num_heads": 8, "rotary_dim": 16,
                  "filter_size": 2048, "max_position_embeddings": 256}


def peak_of(argv: list[str], work) -> tuple[int, str, float]:
    """(exit code, output, peak RSS in bytes) of one command in a child process. The peak is the
    child's own (bench.convert.run_with_peak): wait4's ru_maxrss alone would start from this
    process's RSS when it forks (a pytest-xdist worker holding TensorFlow and torch: 1.8 GiB)."""
    from bench.convert import run_with_peak
    run = run_with_peak([sys.executable, os.path.join(ROOT, argv[0])] + argv[1:],
                        env={**os.environ, "PYTHONPATH": ROOT})
    return run.returncode, run.output, float(run.peak)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(params path, model dir, tokenizer dir, the train command's peak and estimate)."""
    from config.params import parse_params
    from tests.data_helpers import make_tiny_tokenizer
    from tests.runtime_helpers import raw_params
    root = tmp_path_factory.mktemp("measured")
    raw = raw_params(str(root), model=MEASURED_MODEL, runconfig={"max_steps": 1, "save_checkpoints_steps": 1})
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    make_tiny_tokenizer(str(root / "tok"))
    code, err, peak = peak_of(["run.py", "--mode", "train", "--params", str(path), "--model-dir", str(root / "m")], root)
    assert code == 0, err
    estimate = peak_memory.run_estimate(parse_params(raw), "train", str(path))
    return str(path), str(root / "m"), str(root / "tok"), peak, estimate, root


@pytest.mark.processes
def test_training_estimate_is_within_the_margin_of_its_measured_peak(trained):
    *_, peak, estimate, _ = trained
    assert UNDER * peak <= estimate.total <= OVER * peak, (peak / MiB, preflight.describe(estimate))


@pytest.mark.processes
@pytest.mark.parametrize("weight_format", ["float32", "int8"])
def test_predict_estimate_is_within_the_margin_of_its_measured_peak(trained, weight_format):
    from generation import predict
    from generation.flags import add_predict_flags
    import argparse
    path, model_dir, tokenizer, _, _, root = trained
    argv = ["--tokenizer", tokenizer, "--prompt", "the cat sat on", "--max-new-tokens", "4", "--weight-format",
            weight_format]
    code, err, peak = peak_of(["run.py", "--mode", "predict", "--params", path, "--model-dir", model_dir,
                               "--output", str(root / "out.jsonl")] + argv, root)
    assert code == 0, err
    parser = argparse.ArgumentParser()
    add_predict_flags(parser)
    job = predict.prepare(parser.parse_args(argv), load_params(path).model)
    estimate = predict.memory_estimate(job, load_params(path).model)
    assert UNDER * peak <= estimate.total <= OVER * peak, (peak / MiB, preflight.describe(estimate))


def test_predict_counts_samples_as_rows_and_beams_after_the_prefill():
    """run.py predict's cache: prompts x samples rows from the start, prompts x beams after a
    prefill of the prompts alone; each as long as the longest prompt and the new tokens, both
    rounded up to 32 as the Generator rounds them; halving --batch-size halves the rows."""
    from generation import predict
    from generation.config import GenerationConfig
    requests = [predict.PromptRequest("x")] * 5
    for config, rows, prefill in ((GenerationConfig(max_new_tokens=40, do_sample=True, num_return_sequences=3), 12, 12),
                                  (GenerationConfig(max_new_tokens=40, num_beams=4), 16, 4)):
        job = predict.PredictJob(None, requests, config, 4, "graph", "float32", longest_prompt=70)
        terms = dict(predict.memory_estimate(job, TINY).terms)
        length = 96 + 40 + 24                                                    # round_up(round_up(70) + 40)
        copies = 3 if config.num_beams > 1 else 2          # beam search's reorder gathers a third copy
        assert terms["KV cache"] == copies * memory_model.kv_cache_bytes(TINY, rows, length, 4)
        assert terms["prefill activations"] == memory_model.prefill_bytes(TINY, prefill, 96, length, 4)
        halved = peak_memory.generation_terms(TINY, "float32", Decoding(rows // 2, length, 96, prefill // 2,
                                                                        reorders=config.num_beams > 1), "graph",
                                                 loader="direct")
        assert ("--batch-size 2", peak_memory.total_of(halved)) in predict.memory_estimate(job, TINY).fixes
