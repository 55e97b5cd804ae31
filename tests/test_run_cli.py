"""run.py: every mode on a tiny config, bad arguments, and a SIGKILL mid-run that resumes exactly."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

import run
from tests.data_helpers import make_tiny_tokenizer
from tests.runtime_helpers import make_data, raw_params

TOKENIZER_VOCAB = 320
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def params_file(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    make_data(str(root))
    path = root / "params.yaml"
    # vocab 320 fits the tiny byte-level tokenizer of the predict test (records use ids < 64)
    path.write_text(yaml.safe_dump(raw_params(str(root), runconfig={"max_steps": 4, "log_steps": 2},
                                              model={"vocab_size": TOKENIZER_VOCAB})))
    return str(path)


def metrics(model_dir: str) -> dict[int, float]:
    with open(os.path.join(model_dir, "train_metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return {r["step"]: r["loss"] for r in rows}


def test_train_eval_train_and_eval_predict(params_file, tmp_path, capsys):
    model_dir = str(tmp_path / "m")
    assert run.main(["--mode", "train", "--params", params_file, "--model_dir", model_dir]) == 0
    assert sorted(metrics(model_dir)) == [2, 4]
    assert run.main(["--mode", "eval", "--params", params_file, "--model_dir", model_dir, "--steps", "1"]) == 0
    results = json.load(open(os.path.join(model_dir, "eval_results.json")))["latest"]
    assert results["step"] == 4 and results["batches"] == 1
    capsys.readouterr()
    assert run.main(["--mode", "train_and_eval", "--params", params_file, "--model_dir", model_dir,
                     "--max_steps", "6", "--set", "runconfig.eval_every_steps=1"]) == 0
    out = capsys.readouterr().out
    assert out.count(f"restored {model_dir}/ckpt-4 (step 4)") == 1       # said once, not per restore() call
    assert f"results in {model_dir}/eval_results.json" in out
    history = json.load(open(os.path.join(model_dir, "eval_results.json")))["history"]
    assert [h["step"] for h in history] == [4, 5, 6]
    effective = yaml.safe_load(open(os.path.join(model_dir, "params.yaml")))
    assert effective["runconfig"]["max_steps"] == 6 and effective["runconfig"]["eval_every_steps"] == 1
    tokenizer_dir = str(tmp_path / "tok")
    tokenizer = make_tiny_tokenizer(tokenizer_dir, vocab_size=TOKENIZER_VOCAB)
    capsys.readouterr()
    assert run.main(["--mode", "predict", "--params", params_file, "--model_dir", model_dir,
                     "--tokenizer", tokenizer_dir, "--prompt", "the cat", "--max_new_tokens", "5"]) == 0
    record = json.loads(open(os.path.join(model_dir, "predictions.jsonl")).read().splitlines()[-1])
    assert record["prompt"] == "the cat" and record["finish_reason"] in ("length", "stop")
    # token_ids leave out a final stop token (EOS), so a stop may come before 5 tokens
    assert len(record["token_ids"]) == 5 if record["finish_reason"] == "length" else len(record["token_ids"]) < 5
    assert all(0 <= t < TOKENIZER_VOCAB for t in record["token_ids"])
    assert record["completion"] == tokenizer.decode(record["token_ids"], skip_unknown=True)
    streamed = capsys.readouterr()
    assert streamed.out.endswith(record["completion"] + "\n")     # streamed to the console
    assert f"1 completion(s) appended to {model_dir}/predictions.jsonl" in streamed.err


@pytest.mark.parametrize("argv,message", [
    (["--set", "model.num_heads=5"], "model.hidden_size=32 is not divisible by model.num_heads=5"),
    (["--set", "runconfig.max_stepz=3"], "runconfig.max_stepz is not a known key; did you mean runconfig.max_steps?"),
    (["--set", "model.hidden_size"], "is not of the form section.key=value"),
    (["--max_steps", "0"], "runconfig.max_steps=0 must be positive"),
    (["--checkpoint_path", "/nonexistent/ckpt"], "no TF checkpoint at '/nonexistent/ckpt'"),
    (["--set", "train_input.batch_size=6", "--set", "optimizer.grad_accum_steps=4"],
     "train_input.batch_size=6 must be divisible by replicas (1) x optimizer.grad_accum_steps (4)"),
    (["--set", "runconfig.cpu_devices=0"], "runconfig.cpu_devices=0 must be a positive number of logical CPU devices"),
    # This process keeps TensorFlow's one CPU device (tests that split it run their own processes).
    (["--set", "runconfig.mesh={data: 2, model: 2}"],
     "= 4 devices, but this process has 1 CPU device(s); set runconfig.cpu_devices=4 (logical CPU devices)"),
])
def test_bad_params_and_flags_exit_2_with_a_message(params_file, tmp_path, capsys, argv, message):
    assert run.main(["--mode", "train", "--params", params_file, "--model_dir", str(tmp_path / "m")] + argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err


def test_missing_files_and_argument_errors(params_file, tmp_path, capsys):
    assert run.main(["--mode", "train", "--params", str(tmp_path / "nope.yaml"), "--model_dir", "x"]) == 2
    assert "does not exist; pass --params" in capsys.readouterr().err
    assert run.main(["--mode", "train", "--params", params_file]) == 2
    assert "pass --model-dir" in capsys.readouterr().err
    assert run.main(["--mode", "eval", "--params", params_file, "--model_dir", str(tmp_path / "empty")]) == 2
    assert "holds no checkpoint and no --checkpoint-path was given; train first" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        run.main(["--mode", "fly", "--params", params_file])
    assert exit_info.value.code == 2
    assert "invalid choice: 'fly'" in capsys.readouterr().err


def test_help_explains_the_flags(capsys):
    with pytest.raises(SystemExit):
        run.main(["--help"])
    text = capsys.readouterr().out
    for flag in ("--mode", "--params", "--model-dir", "--max-steps", "--steps", "--checkpoint-path",
                 "--execution", "--set", "resumes from the last checkpoint"):
        assert flag in text


def test_sigkill_mid_run_then_rerun_continues_identically(params_file, tmp_path):
    """Kill -9 the training process after its second checkpoint; the same command resumes and
    the losses from there on equal an uninterrupted run's, bit for bit."""
    command = [sys.executable, os.path.join(ROOT, "run.py"), "--mode", "train", "--params", params_file,
               "--max_steps", "12", "--set", "runconfig.log_steps=1"]
    straight, killed = str(tmp_path / "straight"), str(tmp_path / "killed")
    env = dict(os.environ, PYTHONPATH=ROOT)
    subprocess.run(command + ["--model_dir", straight], check=True, env=env, capture_output=True, timeout=300)
    process = subprocess.Popen(command + ["--model_dir", killed], env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not os.path.exists(os.path.join(killed, "ckpt-4.index")) and time.time() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert 4 <= max(metrics(killed)) < 12, "the kill should land mid-run"
    import tensorflow as tf
    resumed_from = int(tf.train.latest_checkpoint(killed).rsplit("-", 1)[1])
    subprocess.run(command + ["--model_dir", killed], check=True, env=env, capture_output=True, timeout=300)
    after = metrics(killed)  # later lines (the resumed run's) win for steps logged twice
    expected = metrics(straight)
    assert [after[s] for s in range(resumed_from + 1, 13)] == [expected[s] for s in range(resumed_from + 1, 13)]


def test_corrupt_tfrecord_is_one_error_naming_the_file(tmp_path, capsys):
    """A checksum failure deep inside tf.data reaches the user as one line, not a traceback."""
    from tests.data_helpers import make_tiny_tfrecords
    data = tmp_path / "data"
    make_tiny_tfrecords(str(data), num_examples=40, seq_len=16, vocab_size=64, shard_size=40)
    shard = data / "train-00000.tfrecord"
    raw = bytearray(shard.read_bytes())
    offset = 0
    for _ in range(20):  # TFRecord framing: length (8), its crc (4), data, data crc (4)
        offset += 16 + int.from_bytes(raw[offset:offset + 8], "little")
    data_start = offset + 12  # record 20's payload: framing intact, payload checksum broken
    raw[data_start:data_start + 10] = bytes(b ^ 0xFF for b in raw[data_start:data_start + 10])
    shard.write_bytes(bytes(raw))
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(raw_params(str(tmp_path / "ok"), runconfig={"max_steps": 1})))
    model_dir = str(tmp_path / "m")
    assert run.main(["--mode", "train", "--params", str(params), "--model_dir", model_dir]) == 0
    capsys.readouterr()
    for mode, section in (("train", "train_input"), ("eval", "eval_input")):
        assert run.main(["--mode", mode, "--params", str(params), "--model_dir", model_dir, "--max_steps", "3",
                         "--set", f"{section}.data_dir={data}"]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {shard}: only ") and "records are readable (checksum mismatch" in err
        assert "skip_corrupt_records: true" in err and "Traceback" not in err
