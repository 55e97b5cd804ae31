"""A training run's model_dir is safe: a failed run damages nothing, one writer at a time,
SIGTERM saves and the rerun resumes (issue 11, items 2-4)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import yaml

import run
from tests.disk_state import snapshot
from tests.runtime_helpers import make_data, raw_params

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, PYTHONPATH=ROOT)


def metrics(model_dir: str) -> dict[int, float]:
    with open(os.path.join(model_dir, "train_metrics.jsonl")) as f:
        return {row["step"]: row["loss"] for row in map(json.loads, f)}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(params file, model_dir) of a tiny run trained 2 steps through the CLI."""
    root = tmp_path_factory.mktemp("rundir")
    make_data(str(root))
    params = root / "params.yaml"
    params.write_text(yaml.safe_dump(raw_params(str(root), runconfig={"max_steps": 2})))
    model_dir = str(root / "good")
    assert run.main(["--mode", "train", "--params", str(params), "--model_dir", model_dir]) == 0
    return str(params), model_dir


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def test_a_changed_model_section_is_refused_before_anything_is_written(trained, capsys):
    params, model_dir = trained
    before = snapshot(model_dir)
    capsys.readouterr()
    assert run.main(["--mode", "train", "--params", params, "--model_dir", model_dir, "--max_steps", "4",
                     "--set", "model.num_hidden_layers=3"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "model.num_hidden_layers: 2 in" in line and "3 now" in line and "--checkpoint-path" in line
    assert snapshot(model_dir) == before
    # the README's next command still works on the good run
    assert run.main(["--mode", "eval", "--params", os.path.join(model_dir, "params.yaml"),
                     "--model_dir", model_dir]) == 0


def test_a_checkpoint_of_another_shape_names_the_tensor_and_both_shapes(trained, tmp_path, capsys):
    params, model_dir = trained
    copy = tmp_path / "copy"
    os.makedirs(copy)
    for name in os.listdir(model_dir):          # the checkpoint without its params.yaml
        if name.startswith(("ckpt-", "checkpoint")):
            with open(os.path.join(model_dir, name), "rb") as src, open(copy / name, "wb") as dst:
                dst.write(src.read())
    before = snapshot(str(copy))
    capsys.readouterr()
    assert run.main(["--mode", "train", "--params", params, "--model_dir", str(copy), "--max_steps", "4",
                     "--set", "model.filter_size=128"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "blocks/0/mlp/fc_in/kernel has shape [32, 64] but the params imply [32, 128]" in line
    assert snapshot(str(copy)) == before


HOLD_LOCK = textwrap.dedent("""
    import sys, time
    from runtime.run_dir import ModelDirLock
    with ModelDirLock(sys.argv[1]):
        print("held", flush=True)
        time.sleep(120)
""")


def test_a_second_training_is_refused_while_one_holds_the_lock_and_a_dead_holder_is_taken_over(
        trained, capsys):
    params, model_dir = trained
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, model_dir], env=ENV, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        before = snapshot(model_dir)
        capsys.readouterr()
        assert run.main(["--mode", "train", "--params", params, "--model_dir", model_dir, "--max_steps", "3"]) == 2
        line = one_error_line(capsys.readouterr().err)
        assert f"in use by another training (pid {holder.pid} on host " in line and "started 20" in line
        assert snapshot(model_dir) == before
    finally:
        holder.kill()              # SIGKILL: the lock file stays, its flock goes with the process
        holder.wait()
    assert os.path.exists(os.path.join(model_dir, ".lock"))
    assert run.main(["--mode", "train", "--params", params, "--model_dir", model_dir, "--max_steps", "3"]) == 0
    out = capsys.readouterr().out
    assert f"taking over the lock of model_dir {model_dir} left by a run that is gone (pid {holder.pid}" in out
    assert not os.path.exists(os.path.join(model_dir, ".lock"))     # a finished run leaves none
    assert sorted(metrics(model_dir)) == [1, 2, 3]


def test_sigterm_saves_says_so_exits_143_and_the_rerun_resumes(trained, tmp_path):
    params, _ = trained
    command = [sys.executable, os.path.join(ROOT, "run.py"), "--mode", "train", "--params", params,
               "--max_steps", "40", "--set", "runconfig.log_steps=1", "--set", "runconfig.save_checkpoints_steps=100"]
    straight, stopped = str(tmp_path / "straight"), str(tmp_path / "stopped")
    subprocess.run(command + ["--model_dir", straight], check=True, env=ENV, capture_output=True, timeout=300)
    process = subprocess.Popen(command + ["--model_dir", stopped], env=ENV, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    metrics_file = os.path.join(stopped, "train_metrics.jsonl")
    deadline = time.time() + 240
    while time.time() < deadline and not (os.path.exists(metrics_file) and len(open(metrics_file).readlines()) >= 3):
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 143, err[-2000:]
    import tensorflow as tf
    saved = int(tf.train.latest_checkpoint(stopped).rsplit("-", 1)[1])
    assert 3 <= saved < 40, "SIGTERM should land mid-run, and no checkpoint was due before step 100"
    assert f"SIGTERM: saved {os.path.join(stopped, f'ckpt-{saved}')} (step {saved}); the same command resumes" in out
    subprocess.run(command + ["--model_dir", stopped], check=True, env=ENV, capture_output=True, timeout=300)
    after, expected = metrics(stopped), metrics(straight)
    assert sorted(after) == list(range(1, 41))
    # the same arithmetic in the same order from the same checkpointed state: bit-identical losses
    assert [after[s] for s in range(saved + 1, 41)] == [expected[s] for s in range(saved + 1, 41)]
