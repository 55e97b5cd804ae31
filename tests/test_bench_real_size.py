"""The parts of bench.real_size that its figures rest on: the random checkpoint is the model
transformers expects, each step's peak RSS is its own, and the int8 error estimate holds for
the project's own quantizer. (The bench end to end starts five TensorFlow/PyTorch processes:
minutes, not seconds, so it is run by hand; see docs/generation.md.)"""
from __future__ import annotations

import sys

import numpy as np
import pytest

from bench.convert import gptj_tensor_shapes, make_checkpoint, run_with_peak
from bench.real_size import compare_logits
from checkpoint_utils.rounding import int8_error


def test_random_checkpoint_is_a_complete_gptj_for_transformers(tmp_path):
    import torch
    import transformers
    transformers.logging.set_verbosity_error()
    size = make_checkpoint(str(tmp_path), hidden=32, layers=2, vocab=96, shard_bytes=20_000, heads=2,
                           rotary_dim=8, dtype="bfloat16")
    shapes = gptj_tensor_shapes(32, 2, 96, 128)
    assert size == 2 * sum(int(np.prod(s)) for s in shapes.values())
    model, info = transformers.GPTJForCausalLM.from_pretrained(str(tmp_path), dtype=torch.bfloat16,
                                                               output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert model.config.n_head == 2 and model.config.rotary_dim == 8 and not model.config.tie_word_embeddings
    norm = model.transformer.h[1].ln_1.weight.detach().float().numpy()
    kernel = model.transformer.h[1].mlp.fc_in.weight.detach().float().numpy()
    # LayerNorm weights 1 + N(0, 0.02), kernels N(0, 0.02): 32 and 4096 samples, 5 standard errors
    assert abs(norm.mean() - 1) < 5 * 0.02 / np.sqrt(32) and abs(kernel.std() - 0.02) < 5 * 0.02 / np.sqrt(2 * 4096)
    assert model.transformer.wte.weight.dtype == torch.bfloat16


def test_each_step_gets_its_own_peak_rss():
    allocate = "import numpy as np; a = np.ones(25_000_000); print(a.sum())"          # 200 MB touched
    big = run_with_peak([sys.executable, "-c", allocate])
    small = run_with_peak([sys.executable, "-c", "pass"])
    assert big.output.strip() == "25000000.0" and big.returncode == small.returncode == 0
    assert big.peak >= 200e6 and small.peak < 100e6          # the second child's peak is not the first's
    assert run_with_peak([sys.executable, "-c", "raise SystemExit(3)"]).returncode == 3


@pytest.mark.numerics
def test_int8_error_estimate_bounds_the_quantizer_s_error():
    """int8_error(n) takes E max|w| over a column of n Gaussian weights as sqrt(2 ln 2n) std, an
    upper bound, so the measured RMS error of generation.weights' quantizer stays below it; the
    bound is not loose by more than the max's known slack (~20% at these n)."""
    import tensorflow as tf

    from generation.weights import dequantize_int8, quantize_int8
    for fan_in in (1024, 4096):
        kernel = np.random.default_rng(fan_in).standard_normal((fan_in, 256), dtype=np.float32) * 0.02
        error = dequantize_int8(*quantize_int8(tf.constant(kernel))).numpy() - kernel
        relative = np.sqrt(np.mean(error ** 2)) / kernel.std()
        assert 0.75 * int8_error(fan_in) < relative <= int8_error(fan_in)


def test_compare_logits_counts_flipped_positions_and_the_largest_error():
    reference = np.random.default_rng(0).standard_normal((2, 4, 50)).astype(np.float32)
    other = reference.copy()
    runner_up = np.argsort(reference[1, 2])[-2]
    other[1, 2, runner_up] += 10.0                                # one position's argmax moves
    result = compare_logits(reference, other, relative_estimate=0.01)
    assert result["top1"] == 7 / 8 and result["positions"] == 8
    assert result["max"] == pytest.approx(10.0) and not result["within"]
    assert result["rms"] == pytest.approx(10.0 / np.sqrt(reference.size))
    assert compare_logits(reference, reference, 0.01)["within"]


@pytest.mark.processes
def test_the_bench_runs_end_to_end_on_a_small_shape(tmp_path, capsys):
    """Every step of bench.real_size (checkpoint, bandwidth, convert, ours in both formats,
    transformers) on a 2-layer model: each prints its time and peak RSS, the report has every
    ratio and quality line, a second run reuses the checkpoint and --clean deletes the work dir."""
    from bench import real_size
    work = tmp_path / "work"
    argv = ["--work-dir", str(work), "--hidden", "64", "--layers", "2", "--heads", "4", "--rotary-dim", "8",
            "--vocab", "512", "--prompt", "24", "--new", "3", "--beams", "2", "--beam-prompt", "8",
            "--quality-prompts", "1", "--quality-length", "8", "--bandwidth-gib", "0.05"]
    assert real_size.main(argv) == 0
    out = capsys.readouterr().out
    for line in ("CPU: ", "bandwidth: ", "convert: ", "ours-int8: ", "ours-bfloat16: ", "transformers: ",
                 "int8 greedy decode: ", "int8 prefill: ", "int8 beam-2 decode: ", "bfloat16 greedy decode: ",
                 "ours bfloat16 vs transformers bfloat16: max |d|", "ours int8 vs ours bfloat16: max |d|"):
        assert line in out, line
    assert "FAILED" not in out and "skipped" not in out and "(built in" in out
    args = real_size.parse_args(argv)
    (checkpoint,) = [p for p in work.iterdir() if p.is_dir()]
    assert real_size.ensure_checkpoint(str(checkpoint / "hf"), args)[1]              # reused, not rebuilt
    assert real_size.main(["--work-dir", str(work), "--clean"]) == 0
    assert not work.exists()
