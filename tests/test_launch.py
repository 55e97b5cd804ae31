"""runtime.launch with stand-in workers (small Python programs, no TensorFlow): each gets its own
TF_CONFIG, its lines come out prefixed, a failure stops the others, signals reach every worker.
tests/test_multi_worker.py runs it with run.py."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, PYTHONPATH=ROOT)

# A worker that prints its task and waits; on SIGTERM it says so and exits 143, as run.py does.
WAITING_WORKER = textwrap.dedent("""
    import json, os, signal, sys, time
    index = json.loads(os.environ["TF_CONFIG"])["task"]["index"]
    def stop(signum, frame):
        print("stopping on", signal.Signals(signum).name, flush=True)
        sys.exit(128 + signum)
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print("ready", flush=True)
    if "FAILING_WORKER" in os.environ:         # fail once every worker has its handlers
        ready = os.environ["READY_DIR"]
        open(os.path.join(ready, str(index)), "w").close()
        if index == int(os.environ["FAILING_WORKER"]):
            workers = len(json.loads(os.environ["TF_CONFIG"])["cluster"]["worker"])
            while len(os.listdir(ready)) < workers:
                time.sleep(0.02)
            print("failing", file=sys.stderr, flush=True)
            sys.exit(3)
    time.sleep(120)
""")


def launch(*args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "runtime.launch", *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kwargs)


def test_help_loads_no_tensorflow_and_bad_input_is_one_error_line():
    done = subprocess.run([sys.executable, "-c", "import sys, runtime.launch as l\n"
                           "try:\n    l.main(['--help'])\nexcept SystemExit as e:\n    code = e.code\n"
                           "print('TF' if 'tensorflow' in sys.modules else 'no TF', code)"],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=60)
    assert done.stdout.splitlines()[-1] == "no TF 0" and "--workers" in done.stdout
    for argv, message in ((["--workers", "0", "--", "true"], "--workers must be at least 1 (got 0)"),
                          (["--workers", "2"], "no command to run: put it after --"),
                          (["--workers", "2", "--"], "no command to run"),
                          (["--workers", "two", "--", "true"], "argument --workers: invalid int value")):
        process = launch(*argv, env=ENV)
        out, err = process.communicate(timeout=60)
        errors = [line for line in err.splitlines() if "error:" in line]
        assert process.returncode == 2 and len(errors) == 1 and message in errors[0], (argv, err)


def test_each_worker_gets_its_task_on_distinct_loopback_ports_and_prefixed_lines():
    program = ("import json, os; c = json.loads(os.environ['TF_CONFIG']); "
               "print(c['task']['type'], c['task']['index'], ' '.join(c['cluster']['worker']))")
    process = launch("--workers", "3", "--", sys.executable, "-c", program, env=ENV)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 0, err
    lines = sorted(out.splitlines())
    assert [line.split()[:4] for line in lines] == [["[worker", f"{i}]", "worker", str(i)] for i in range(3)]
    clusters = {tuple(line.split()[4:]) for line in lines}
    assert len(clusters) == 1                                       # one cluster, seen alike by all
    addresses = next(iter(clusters))
    assert len(set(addresses)) == 3 and all(a.startswith("127.0.0.1:") for a in addresses)


def test_a_failing_worker_stops_the_others_and_is_named(tmp_path):
    process = launch("--workers", "3", "--grace-seconds", "20", "--", sys.executable, "-c", WAITING_WORKER,
                     env=dict(ENV, FAILING_WORKER="1", READY_DIR=str(tmp_path)))
    out, err = process.communicate(timeout=60)
    assert process.returncode == 3
    assert "[worker 1] failing" in err
    assert err.strip().splitlines()[-1].startswith("error: worker 1 exited with status 3; stopped the other workers")
    for worker in (0, 2):                        # stopped by SIGTERM, not by the grace period's SIGKILL
        assert f"[worker {worker}] stopping on SIGTERM" in out


def test_sigint_and_sigterm_reach_every_worker():
    for signum in (signal.SIGINT, signal.SIGTERM):
        process = launch("--workers", "2", "--", sys.executable, "-c", WAITING_WORKER, env=ENV)
        ready = 0
        while ready < 2:                          # both workers started and installed their handlers
            line = process.stdout.readline()
            assert line, "a worker ended before it was ready"
            ready += line.endswith("ready\n")
        time.sleep(0.2)
        process.send_signal(signum)
        out, err = process.communicate(timeout=60)
        assert process.returncode == 128 + signum, err
        for worker in (0, 1):
            assert f"[worker {worker}] stopping on {signal.Signals(signum).name}" in out
        assert "error:" not in err
