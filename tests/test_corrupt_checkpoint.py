"""A broken latest checkpoint (issue 20, item 4): a resume, eval or predict falls back to the
newest whole checkpoint with one warning naming the broken one and what is wrong with it; a
model_dir whose checkpoint files are all broken is refused in one line, changing nothing.

One tiny run (ckpt-2 and ckpt-4) is trained once; each case damages a copy of it. The straight
run's logged losses are what an undamaged resume from ckpt-2 logs too: a resume is exact (same
state, same data position, stateless dropout; tests/test_run_dir.py), so a fallback resume must
log them bit for bit.
"""
from __future__ import annotations

import json
import os
import shutil

import pytest
import yaml

import run
from tests.disk_state import disk_changes, snapshot
from tests.runtime_helpers import make_data, raw_params

DATA_FILE = "ckpt-4.data-00000-of-00001"


def metrics(model_dir: str) -> dict[int, float]:
    with open(os.path.join(model_dir, "train_metrics.jsonl")) as f:
        return {row["step"]: row["loss"] for row in map(json.loads, f)}


def stderr_lines(err: str) -> list[str]:
    """What the command itself wrote to stderr (TensorFlow's own log lines are not it)."""
    return [line for line in err.splitlines() if line.strip() and not line.startswith(("I0000", "W0000", "E0000"))]


def checkpoint_state(model_dir: str) -> tuple[str, list[str]]:
    import tensorflow as tf
    state = tf.train.get_checkpoint_state(model_dir)
    return (os.path.basename(state.model_checkpoint_path),
            [os.path.basename(p) for p in state.all_model_checkpoint_paths])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(params file, pristine model_dir with ckpt-2 and ckpt-4, its losses by step)."""
    root = tmp_path_factory.mktemp("corrupt")
    make_data(str(root))
    params = root / "params.yaml"
    params.write_text(yaml.safe_dump(raw_params(str(root), runconfig={"max_steps": 4, "save_checkpoints_steps": 2})))
    model_dir = str(root / "pristine")
    assert run.main(["--mode", "train", "--params", str(params), "--model_dir", model_dir]) == 0
    assert checkpoint_state(model_dir) == ("ckpt-4", ["ckpt-2", "ckpt-4"])
    return str(params), model_dir, metrics(model_dir)


def damaged_copy(trained, tmp_path, damage: str) -> str:
    _, pristine, _ = trained
    model_dir = str(tmp_path / "run")
    shutil.copytree(pristine, model_dir)
    data = os.path.join(model_dir, DATA_FILE)
    if damage == "truncated_data":
        os.truncate(data, os.path.getsize(data) // 2)
    elif damage == "missing_index":
        os.unlink(os.path.join(model_dir, "ckpt-4.index"))
    elif damage == "state_names_missing_prefix":        # `checkpoint` still names ckpt-4
        for name in ("ckpt-4.index", DATA_FILE):
            os.unlink(os.path.join(model_dir, name))
    elif damage == "corrupted_bytes":                   # same size: only the checksums can tell
        with open(data, "rb") as f:
            raw = f.read()
        with open(data, "wb") as f:
            f.write(bytes(b ^ 0xFF for b in raw))
    else:
        raise AssertionError(damage)
    return model_dir


WHAT_IS_WRONG = {
    "truncated_data": f"ckpt-4: its data file {DATA_FILE} is cut short (",
    "missing_index": "ckpt-4: its index ckpt-4.index is missing",
    "state_names_missing_prefix": "ckpt-4: none of its files exist",
}


@pytest.mark.parametrize("damage", list(WHAT_IS_WRONG))
def test_a_resume_falls_back_to_the_previous_checkpoint_and_logs_the_same_losses(trained, tmp_path, damage, capfd):
    """keep_checkpoint_max 2: were the broken ckpt-4 still in the checkpoint list, saving ckpt-3
    would rotate the good ckpt-2 out and keep the broken one."""
    params, _, straight = trained
    model_dir = damaged_copy(trained, tmp_path, damage)
    broken = {name: value for name, value in snapshot(model_dir).items() if name.startswith("ckpt-4")}
    capfd.readouterr()
    assert run.main(["--mode", "train", "--params", params, "--model_dir", model_dir, "--max_steps", "3",
                     "--set", "runconfig.keep_checkpoint_max=2"]) == 0
    out, err = capfd.readouterr()
    lines = stderr_lines(err)
    assert len(lines) == 1 and lines[0].startswith("warning: skipped unusable checkpoint in "), err
    assert WHAT_IS_WRONG[damage] in lines[0] and "using ckpt-2, the newest whole one" in lines[0]
    assert "left in place" in lines[0]
    assert f"restored {os.path.join(model_dir, 'ckpt-2')} (step 2)" in out
    assert metrics(model_dir) == {step: straight[step] for step in (1, 2, 3)}      # bit-identical
    # the broken checkpoint's files are untouched, and out of the list: a later resume takes ckpt-3 quietly
    assert {name: value for name, value in snapshot(model_dir).items() if name.startswith("ckpt-4")} == broken
    assert checkpoint_state(model_dir) == ("ckpt-3", ["ckpt-2", "ckpt-3"])
    from checkpoint_utils.integrity import newest_whole_checkpoint
    assert newest_whole_checkpoint(model_dir, "") == (os.path.join(model_dir, "ckpt-3"), [])


@pytest.mark.parametrize("damage", ["truncated_data", "corrupted_bytes"])
def test_eval_falls_back_and_changes_no_checkpoint_file(trained, tmp_path, damage, capfd):
    """corrupted_bytes: the index cannot show it; the restore's checksum error is the sign."""
    params, _, _ = trained
    model_dir = damaged_copy(trained, tmp_path, damage)
    before = snapshot(model_dir)
    capfd.readouterr()
    assert run.main(["--mode", "eval", "--params", params, "--model_dir", model_dir]) == 0
    lines = stderr_lines(capfd.readouterr().err)
    assert len(lines) == 1 and "using ckpt-2, the newest whole one" in lines[0], lines
    expected = WHAT_IS_WRONG.get(damage, "ckpt-4: its data cannot be read (")
    assert expected in lines[0]
    with open(os.path.join(model_dir, "eval_results.json")) as f:
        assert json.load(f)["latest"]["step"] == 2
    changes = disk_changes(before, snapshot(model_dir))
    assert changes and all(c.startswith("added: ") and c[7:].startswith(("eval", "eval_results.json"))
                           for c in changes), changes


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_no_whole_checkpoint_is_one_line_exit_2_and_nothing_changes(trained, tmp_path, mode, capfd):
    """Training must not start from scratch over a run's checkpoints, nor eval read random weights."""
    params, _, _ = trained
    model_dir = damaged_copy(trained, tmp_path, "truncated_data")
    os.unlink(os.path.join(model_dir, "ckpt-2.index"))
    before = snapshot(model_dir)
    capfd.readouterr()
    assert run.main(["--mode", mode, "--params", params, "--model_dir", model_dir, "--max_steps", "6"]) == 2
    lines = stderr_lines(capfd.readouterr().err)
    assert len(lines) == 1 and lines[0].startswith(f"error: {model_dir} holds checkpoint files ("), lines
    assert "but no whole checkpoint (ckpt-4: its data file" in lines[0]
    assert "ckpt-2: its index ckpt-2.index is missing" in lines[0]
    assert "delete them or use a new --model-dir" in lines[0]
    assert disk_changes(before, snapshot(model_dir)) == []


def test_warm_start_from_a_broken_checkpoint_is_one_line(trained, tmp_path, capfd):
    params, _, _ = trained
    source = damaged_copy(trained, tmp_path, "truncated_data")
    new_dir = str(tmp_path / "warm")
    capfd.readouterr()
    assert run.main(["--mode", "train", "--params", params, "--model_dir", new_dir, "--max_steps", "1",
                     "--checkpoint_path", os.path.join(source, "ckpt-4")]) == 2
    lines = stderr_lines(capfd.readouterr().err)
    assert len(lines) == 1 and lines[0].startswith(f"error: checkpoint {os.path.join(source, 'ckpt-4')} is "
                                                   f"unusable: its data file {DATA_FILE} is cut short"), lines
    assert not os.path.exists(new_dir)
