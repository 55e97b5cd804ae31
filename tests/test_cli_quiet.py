"""Every CLI starts quietly: --help loads no TensorFlow and a run prints none of TensorFlow's
known start-up notices unless --verbose; every flag says what it is for."""
from __future__ import annotations

import ast
import json
import os
import subprocess
import sys

import pytest
import yaml

from config.quiet import _known_noise_filtered, is_known_noise

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLI_MODULES = ["run", "demo", "checkpoint_utils.convert_hf", "checkpoint_utils.export_hf", "checkpoint_utils.verify",
               "input.scripts.pile.preprocess", "input.scripts.pile.download", "input.scripts.train_tokenizer",
               "input.scripts.make_local_corpus", "bench.convert", "bench.data", "bench.generate", "bench.train",
               "bench.weight_streaming", "bench.mlperf.run", "bench.mlperf.accuracy", "bench.summarize",
               "fine_tuning.abstractive_summarization.prepare", "fine_tuning.abstractive_summarization.evaluate",
               "fine_tuning.abstractive_summarization.demo", "serving.server", "serving.export", "serving.triton"]
# These import TensorFlow at module level: their --help is quiet but not light.
CLI_MODULES_LOADING_TENSORFLOW = ["bench.serve"]
# Lines this TensorFlow printed on this machine (2 cores, no GPU, no CUDA driver).
NOISE = [
    "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR",
    "I0000 00:00:1796036990.796057    5653 port.cc:153] oneDNN custom operations are on. You may see slightly "
    "different numerical results due to floating-point round-off errors from different computation orders. "
    "To turn them off, set the environment variable `TF_ENABLE_ONEDNN_OPTS=0`.",
    "I0000 00:00:1796036990.796425    5653 cudart_stub.cc:31] Could not find cuda drivers on your machine, GPU "
    "will not be used.",
    "E0000 00:00:1796037014.173429    5844 cuda_platform.cc:52] failed call to cuInit: INTERNAL: CUDA error: "
    "Failed call to cuInit: UNKNOWN ERROR (303)",
    "I0000 00:00:1796036990.932297    5653 cpu_feature_guard.cc:227] This TensorFlow binary is optimized to use "
    "available CPU instructions in performance-critical operations.",
    "To enable the following instructions: AVX2 AVX512F FMA, in other operations, rebuild TensorFlow with the "
    "appropriate compiler flags.",
]
NOT_NOISE = [
    "E0000 00:00:1796037014.173429    5844 cuda_platform.cc:52] cuMemAlloc failed: out of memory",
    "W0000 00:00:1796037014.173429    5844 port.cc:153] oneDNN custom operations failed to load",
    "E0000 00:00:1796037014.173429    5844 bfc_allocator.cc:52] failed call to cuInit: see cuda_platform.cc",
    "error: --source 'x' is not a directory",
    "Traceback (most recent call last):",
]
# What a user's shell has: no test-suite settings that would hide or change TensorFlow's start-up.
USER_ENV = {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", "CUDA_VISIBLE_DEVICES")}


def test_known_noise_is_recognised_and_nothing_else():
    assert all(is_known_noise(line) for line in NOISE)
    assert not any(is_known_noise(line) for line in NOT_NOISE)


def test_the_filter_passes_other_lines_through_in_order(capfd):
    with _known_noise_filtered():
        for line in NOT_NOISE[:2] + NOISE + NOT_NOISE[2:]:
            os.write(2, (line + "\n").encode())
    assert capfd.readouterr().err.splitlines() == NOT_NOISE


_HELP_DRIVER = """
import contextlib, io, json, runpy, sys
report = {}
argument, modules = sys.argv[1], sys.argv[2:]
for module in modules:
    sys.argv = [module, argument]
    out, code = io.StringIO(), "returned without exiting"
    with contextlib.redirect_stdout(out):
        try:
            runpy.run_module(module, run_name="__main__", alter_sys=True)
        except SystemExit as exit:
            code = exit.code
    report[module] = {"exit": code, "verbose_flag": "--verbose" in out.getvalue(),
                      "tensorflow": "tensorflow" in sys.modules}
print(json.dumps(report))
"""


def test_help_loads_no_tensorflow_and_prints_nothing_on_stderr():
    """All CLIs in one interpreter, in order: a module that loaded TensorFlow would show in its own entry."""
    result = subprocess.run([sys.executable, "-c", _HELP_DRIVER, "--help", *CLI_MODULES], capture_output=True,
                            text=True, cwd=ROOT, env=USER_ENV, timeout=300)
    assert result.returncode == 0 and result.stderr == "", result.stderr
    report = json.loads(result.stdout)
    assert report == {m: {"exit": 0, "verbose_flag": True, "tensorflow": False} for m in CLI_MODULES}


def test_an_argument_error_loads_no_tensorflow():
    """argparse's usage error (exit 2) comes before any TensorFlow import, as --help does."""
    result = subprocess.run([sys.executable, "-c", _HELP_DRIVER, "--no-such-flag", *CLI_MODULES],
                            capture_output=True, text=True, cwd=ROOT, env=USER_ENV, timeout=300)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert {m: (r["exit"], r["tensorflow"]) for m, r in report.items()} == {m: (2, False) for m in CLI_MODULES}
    assert result.stderr.count("error: ") == len(CLI_MODULES)      # argparse's line (a missing or unknown flag)


def test_help_of_the_clis_that_load_tensorflow_prints_nothing_on_stderr():
    result = subprocess.run([sys.executable, "-c", _HELP_DRIVER, "--help", *CLI_MODULES_LOADING_TENSORFLOW],
                            capture_output=True, text=True, cwd=ROOT, env=USER_ENV, timeout=300)
    assert result.returncode == 0 and result.stderr == "", result.stderr
    report = json.loads(result.stdout)
    assert {m: (r["exit"], r["verbose_flag"]) for m, r in report.items()} == {
        m: (0, True) for m in CLI_MODULES_LOADING_TENSORFLOW}


def test_every_cli_flag_has_help_text():
    missing = []
    for module in CLI_MODULES + CLI_MODULES_LOADING_TENSORFLOW:
        path = os.path.join(ROOT, *module.split(".")) + ".py"
        for node in ast.walk(ast.parse(open(path, encoding="utf-8").read(), path)):
            if (isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "add_argument"
                    and not any(k.arg == "help" for k in node.keywords)):
                missing.append(f"{module}:{node.lineno}")
    assert not missing


@pytest.fixture(scope="module")
def untokenized_export(tmp_path_factory):
    """argv of an export that succeeds and warns (no tokenizer): a run that loads TensorFlow."""
    import tensorflow as tf

    from config.params import load_params
    from model import GPTJModel
    root = tmp_path_factory.mktemp("quiet")
    (root / "params.yaml").write_text(yaml.safe_dump({"model": {
        "vocab_size": 64, "hidden_size": 16, "num_hidden_layers": 1, "num_heads": 2, "rotary_dim": 4,
        "filter_size": 32, "max_position_embeddings": 32}}))
    tf.train.Checkpoint(model=GPTJModel(load_params(str(root / "params.yaml")).model)).write(str(root / "ckpt-1"))
    return root, ["-m", "checkpoint_utils.export_hf", "--params", str(root / "params.yaml"),
                  "--checkpoint", str(root / "ckpt-1"), "--no-progress"]


@pytest.mark.parametrize("verbose", [False, True], ids=["quiet", "verbose"])
def test_a_run_prints_tensorflow_notices_only_when_verbose(untokenized_export, verbose):
    root, argv = untokenized_export
    argv = argv + ["--output-dir", str(root / f"out_{verbose}")] + (["--verbose"] if verbose else [])
    result = subprocess.run([sys.executable, *argv], capture_output=True, text=True, cwd=ROOT, env=USER_ENV,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    noise = [line for line in lines if is_known_noise(line)]
    others = [line for line in lines if not is_known_noise(line)]
    assert len(others) == 1 and others[0].startswith("warning: no tokenizer given or recorded")   # kept
    if verbose:
        assert noise          # this TensorFlow does print them: the quiet run's silence is the filter's doing
    else:
        assert noise == []


def test_an_error_run_that_loads_tensorflow_prints_one_line(tmp_path):
    result = subprocess.run([sys.executable, "run.py", "--mode", "eval", "--params", "configs/params_gptj_tiny.yaml",
                             "--model_dir", str(tmp_path / "empty")], capture_output=True, text=True, cwd=ROOT,
                            env=USER_ENV, timeout=300)
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
