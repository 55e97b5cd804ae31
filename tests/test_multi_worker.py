"""Two worker processes on loopback (run.py, MultiWorkerMirroredStrategy) train as one process
does on the same global batch; each reads its own files; only the chief writes model_dir; every
worker logs its cluster and ends without an error line; a worker killed mid-run and the job
restarted (runtime.launch) continue like an uninterrupted run.

Two 2-worker jobs serve the module: `slurm_run`, started as srun starts the two tasks of a job
step on one node (SLURM's variables, faked on loopback; the cluster resolved by runconfig.cluster:
auto), checked by several tests; and the launcher's (TF_CONFIG) kill-and-resume job. The reference
(one process, one device, fed each step the two workers' halves of the global batch) trains once
for the module, in this process.
"""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import types

import numpy as np
import pytest
import tensorflow as tf
import yaml

import data as data_module
from config import modes
from config.params import parse_params
from model import build_model
from runtime.estimator import Estimator
from runtime.launch import LOOPBACK
from tests.data_helpers import make_tiny_tfrecords
from tests.numerics import adam_weight_atol, assert_weights_close
from tests.runtime_helpers import SEQ, VOCAB, raw_params
from tests.test_weight_streaming import LOSS_RTOL

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKERS, STEPS, FILE_RECORDS, LR = 2, 10, 16, 3e-3


def example_index(input_ids: np.ndarray) -> int:
    """Which record of make_tiny_tfrecords this is: its first token is 7 * index mod 64 (55 = 7^-1 mod 64)."""
    return int(input_ids[0]) * 55 % VOCAB


def metrics(model_dir: str) -> dict[int, float]:
    """Step -> loss of train_metrics.jsonl (for a step logged twice, the later line: the resumed run's)."""
    with open(os.path.join(model_dir, "train_metrics.jsonl"), encoding="utf-8") as f:
        return {row["step"]: row["loss"] for row in map(json.loads, f)}


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """The tiny data and params of a 2-worker training, and the commands that run it."""
    root = tmp_path_factory.mktemp("multi_worker")
    train = str(root / "train")
    # 64 distinct records (token ids < 64) in 4 files of 16: each worker reads 2 files.
    make_tiny_tfrecords(train, num_examples=4 * FILE_RECORDS, seq_len=SEQ, vocab_size=VOCAB, shard_size=FILE_RECORDS)
    # deterministic: false, as a user's run (op determinism makes TF's tf.data rewrite log an E0000
    # NodeDef line, which the check for error lines would count); the comparison is to rounding anyway
    raw = raw_params(str(root), train_input={"data_dir": train},
                     runconfig={"max_steps": STEPS, "strategy": "multi_worker", "save_checkpoints_steps": 2,
                                "keep_checkpoint_max": 0, "deterministic": False})
    params_path = root / "params.yaml"
    params_path.write_text(yaml.safe_dump(raw))

    def train(model_dir: str) -> list[str]:
        return ["run.py", "--mode", "train", "--params", str(params_path), "--model-dir", model_dir]

    def command(model_dir: str) -> list[str]:
        return [sys.executable, "-m", "runtime.launch", "--workers", str(WORKERS), "--grace-seconds", "5", "--",
                *train(model_dir)]

    return types.SimpleNamespace(root=root, raw=raw, train=train, command=command)


def launch_env(scratch) -> dict:
    """The workers' environment, without a cluster of the test runner's own (TF_CONFIG, SLURM's);
    TMPDIR is where a non-chief writes (and deletes) its checkpoints."""
    os.makedirs(scratch, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k != "TF_CONFIG" and not k.startswith(("SLURM_", "SLURMD_"))}
    return dict(env, PYTHONPATH=ROOT, TMPDIR=str(scratch))


def free_port_pair() -> int:
    """A port p such that p and p + 1 are free on loopback now: a node's k-th SLURM task listens on
    runconfig.slurm_port_base + k."""
    for _ in range(100):
        with socket.socket() as first, socket.socket() as second:
            first.bind((LOOPBACK, 0))
            port = first.getsockname()[1]
            try:
                second.bind((LOOPBACK, port + 1))
            except OSError:
                continue
            return port
    raise RuntimeError("no two consecutive free ports on loopback")


def slurm_task_env(env: dict, rank: int) -> dict:
    """What srun sets for task `rank` of a 2-task job step on one node, `localhost` (no scontrol:
    runtime/cluster.py expands the node list itself)."""
    return dict(env, SLURM_JOB_ID="1", SLURM_STEP_ID="0", SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank),
                SLURM_NODEID="0", SLURMD_NODENAME="localhost", SLURM_STEP_NODELIST="localhost",
                SLURM_JOB_NODELIST="localhost", SLURM_STEP_NUM_TASKS=str(WORKERS), SLURM_NTASKS=str(WORKERS),
                SLURM_STEP_TASKS_PER_NODE=str(WORKERS), SLURM_TASKS_PER_NODE=str(WORKERS))


@pytest.fixture(scope="module")
def slurm_run(job, tmp_path_factory):
    """The module's 2-worker training, started as srun starts a job step's two tasks: each its own
    process with SLURM's variables, the cluster left to runconfig.cluster: auto."""
    root = tmp_path_factory.mktemp("slurm_run")
    model_dir, env = str(root / "run"), launch_env(root / "scratch")
    port = free_port_pair()
    logs = [root / f"task{rank}.log" for rank in range(WORKERS)]
    processes = []
    for rank, log in enumerate(logs):
        with open(log, "wb") as out:          # stdout and stderr in one file: one task's output, in order
            processes.append(subprocess.Popen(
                [sys.executable, *job.train(model_dir), "--set", f"runconfig.slurm_port_base={port}"],
                cwd=ROOT, env=slurm_task_env(env, rank), stdout=out, stderr=subprocess.STDOUT))
    try:
        statuses = [process.wait(timeout=400) for process in processes]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    return types.SimpleNamespace(model_dir=model_dir, scratch=root / "scratch", port=port, statuses=statuses,
                                 outputs=[log.read_text(errors="replace") for log in logs])


def error_lines(output: str) -> list[str]:
    """TensorFlow's error-level log lines (E0000 ...) and the coordination service's complaints
    about a worker that left (StartAbort, unhealthy) in a worker's output."""
    return [line for line in output.splitlines()
            if re.match(r"(\[worker \d\] )?E\d{4} ", line) or "StartAbort" in line or "unhealthy" in line]


@pytest.fixture(scope="module")
def reference(job, tmp_path_factory):
    """(losses by step, the estimator) of one process on one device, fed each step the global batch
    the two workers read together."""
    # graph mode, as the workers on CPU: the runs differ by summation order only
    params = parse_params({**job.raw, "runconfig": {**job.raw["runconfig"], "strategy": "one_device",
                                                    "jit_compile": False}})
    estimator = Estimator(params, str(tmp_path_factory.mktemp("reference")), input_fn=both_pipelines_input_fn)
    losses = {}
    estimator.train(on_step=lambda step, logs: losses.__setitem__(step, logs["loss"]))
    return losses, estimator


def pipeline_context(index: int) -> tf.distribute.InputContext:
    return tf.distribute.InputContext(num_input_pipelines=WORKERS, input_pipeline_id=index,
                                      num_replicas_in_sync=WORKERS)


def both_pipelines_input_fn(params, mode, input_context=None, data_position=0):
    """One process's input holding, per step, the global batch the two workers read: worker 0's
    half then worker 1's ([b/2, S] each, concatenated to [b, S])."""
    halves = [data_module.input_fn(params, mode, pipeline_context(i), data_position) for i in range(WORKERS)]
    return tf.data.Dataset.zip(tuple(halves)).map(
        lambda *parts: ({name: tf.concat([p[0][name] for p in parts], 0) for name in parts[0][0]},
                        tf.concat([p[1] for p in parts], 0)))


def test_workers_read_disjoint_files_that_together_are_all_the_data(job):
    """input_pipeline_id i of 2 reads files i and i + 2 (train-00000 .. 00003), records of no other."""
    params = parse_params(job.raw)
    seen = []
    for index in range(WORKERS):
        dataset = data_module.input_fn(params, modes.TRAIN, pipeline_context(index))
        epoch = [example_index(ids) for features, _ in dataset.take(2 * FILE_RECORDS // 4)
                 for ids in features["input_ids"].numpy()]                       # one epoch: 32 records
        assert sorted({i // FILE_RECORDS for i in epoch}) == [index, index + WORKERS]
        seen += epoch
    assert sorted(seen) == list(range(4 * FILE_RECORDS))


def assert_losses_match(losses: dict[int, float], expected: dict[int, float], steps) -> None:
    # The all-reduce sums the two halves' gradients in another order than one device's batch of 8,
    # and the workers' matmuls run on batches of 4: summation order only.
    # LOSS_RTOL is argued for 4 steps with a 5x margin; the weights' drift by rounding grows about
    # linearly with the steps, so 10 steps use 2.5x of it.
    for step in steps:
        assert losses[step] == pytest.approx(expected[step], rel=LOSS_RTOL), step


@pytest.mark.numerics
@pytest.mark.processes
def test_two_workers_equal_one_process(job, reference, slurm_run):
    """The chief's logged losses and final weights equal the one-process run's."""
    assert slurm_run.statuses == [0] * WORKERS, "\n".join(o[-3000:] for o in slurm_run.outputs)
    expected, estimator = reference
    losses = metrics(slurm_run.model_dir)
    assert sorted(losses) == list(range(1, STEPS + 1))       # every step logged once: by the chief only
    assert_losses_match(losses, expected, range(1, STEPS + 1))
    trained = build_model(estimator.params)
    tf.train.Checkpoint(model=trained).read(os.path.join(slurm_run.model_dir, f"ckpt-{STEPS}")).expect_partial()
    assert_weights_close(estimator.model.trainable_variables, trained.trainable_variables,
                         adam_weight_atol(STEPS, LR), STEPS)


@pytest.mark.processes
def test_only_the_chief_writes_model_dir(slurm_run):
    """model_dir holds one writer's files: the chief's checkpoints, params.yaml, metrics, one event
    file; the lock is released; the non-chief's scratch checkpoints are gone."""
    assert slurm_run.statuses == [0] * WORKERS
    assert set(os.listdir(slurm_run.model_dir)) == {"checkpoint", "params.yaml", "train_metrics.jsonl", "train"} | {
        f"ckpt-{step}.{ext}" for step in range(2, STEPS + 1, 2) for ext in ("index", "data-00000-of-00001")}
    assert len(os.listdir(os.path.join(slurm_run.model_dir, "train"))) == 1
    assert os.listdir(slurm_run.scratch) == []


@pytest.mark.processes
def test_each_worker_logs_its_slurm_task_and_ends_without_an_error_line(slurm_run):
    """Each task logs the workers and its own role once, prints its progress, and leaves without
    an error line: no worker exits while another still heartbeats to the coordination service."""
    workers = f"localhost:{slurm_run.port}, localhost:{slurm_run.port + 1}"
    for rank, output in enumerate(slurm_run.outputs):
        role = f"worker {rank}" + (" (the chief)" if rank == 0 else "")
        found = [line for line in output.splitlines() if "cluster from" in line]
        assert len(found) == 1 and found[0].endswith(
            f"cluster from the SLURM job step: 2 workers {workers}; this process is {role}"), output[-3000:]
        assert f"step {STEPS}/{STEPS}" in output
        assert error_lines(output) == [], output[-3000:]


def worker_pids(launcher: subprocess.Popen) -> list[int]:
    """The launcher's children, in start order (worker 0 first)."""
    with open(f"/proc/{launcher.pid}/task/{launcher.pid}/children", encoding="utf-8") as f:
        return sorted(int(pid) for pid in f.read().split())


@pytest.mark.processes
def test_a_killed_worker_and_a_restart_continue_like_an_uninterrupted_run(job, reference, tmp_path):
    """SIGKILL the chief after the step-2 checkpoint: the launcher stops the other worker and fails
    naming worker 0; the same command resumes from the last checkpoint (weights, optimizer, data
    position) and logs the uninterrupted run's losses."""
    killed, env = str(tmp_path / "killed"), launch_env(tmp_path / "scratch")
    launcher = subprocess.Popen(job.command(killed), cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while tf.train.latest_checkpoint(killed) is None and time.time() < deadline:     # ckpt-2, and its state file
        time.sleep(0.05)
    os.kill(worker_pids(launcher)[0], signal.SIGKILL)
    out, err = launcher.communicate(timeout=120)
    assert launcher.returncode == 128 + signal.SIGKILL, err[-3000:]
    assert "error: worker 0 was killed by SIGKILL" in err
    assert 2 <= max(metrics(killed)) < STEPS, "the kill should land mid-run"
    resumed_from = int(tf.train.latest_checkpoint(killed).rsplit("-", 1)[1])

    done = subprocess.run(job.command(killed), cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert error_lines(done.stdout + done.stderr) == []        # the TF_CONFIG job ends cleanly too
    for worker in range(WORKERS):                               # the launcher prefixed both workers' lines
        assert any(line.startswith(f"[worker {worker}] ") and f"step {STEPS}/{STEPS}" in line
                   for line in done.stdout.splitlines())
    assert f"restored {os.path.join(killed, f'ckpt-{resumed_from}')}" in done.stdout
    assert "taking over the lock" in done.stdout         # the killed chief's lock file
    losses = metrics(killed)
    assert sorted(losses) == list(range(1, STEPS + 1))
    # a wrong data position would train on other records: losses off by far more than rounding
    # (the bound is test_two_workers_equal_one_process's)
    assert_losses_match(losses, reference[0], range(resumed_from + 1, STEPS + 1))
