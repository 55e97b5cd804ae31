"""Run N workers of one multi-worker job on this machine: one process per worker on loopback.

  python -m runtime.launch --workers 2 -- run.py --mode train --params P.yaml --model-dir runs/x \\
      --set runconfig.strategy=multi_worker

Picks N free loopback ports, starts the command N times with `TF_CONFIG` naming the cluster
and that process's task (worker 0 is the chief), prefixes every output line with
`[worker i]`, forwards SIGINT and SIGTERM to every worker (they stop together at the end of a
step, save and exit; a second signal kills them), and when a worker fails stops the others and exits with its status,
naming it. A command starting with a `.py` file runs under this Python. The workers run in
their own process group (a terminal's Ctrl-C reaches them once, through the launcher), so a
launcher killed with SIGKILL leaves them running. On N machines, set TF_CONFIG on each
yourself, run them under SLURM's srun or as a Kubeflow TFJob instead (runconfig.cluster;
docs/scaling.md, "Multi-worker data parallelism").

The launcher never imports TensorFlow: its workers do.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

from config.cli import ArgumentParser

LOOPBACK = "127.0.0.1"


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="python -m runtime.launch", description=__doc__.split("\n\n")[0],
                            epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter,
                            usage="%(prog)s --workers N [--grace-seconds S] -- COMMAND [ARGS...]")
    parser.add_argument("--workers", type=int, required=True, help="worker processes to start (at least 1)")
    parser.add_argument("--grace-seconds", type=float, default=30.0,
                        help="after a worker fails, how long the others get to exit on SIGTERM before SIGKILL "
                             "(a worker waiting in an all-reduce for the failed one cannot finish its step)")
    return parser


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """(launcher flags, the workers' command): the command is everything after the first `--`."""
    parser = build_parser()
    split = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:split])
    command = argv[split + 1:]
    if args.workers < 1:
        parser.error(f"--workers must be at least 1 (got {args.workers})")
    if not command:
        parser.error("no command to run: put it after --, e.g. -- run.py --mode train --params P.yaml "
                     "--model-dir runs/x --set runconfig.strategy=multi_worker")
    if args.grace_seconds < 0:
        parser.error(f"--grace-seconds must be >= 0 (got {args.grace_seconds})")
    return args, command


def free_ports(count: int) -> list[int]:
    """`count` distinct ports free on loopback now (all held open together, so none repeats)."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind((LOOPBACK, 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def tf_config(addresses: list[str], index: int) -> str:
    """TF_CONFIG of worker `index` in a chief-less cluster of `addresses` (worker 0 is the chief)."""
    return json.dumps({"cluster": {"worker": addresses}, "task": {"type": "worker", "index": index}})


def worker_command(command: list[str]) -> list[str]:
    """A command starting with a Python file runs under this interpreter."""
    return [sys.executable] + command if command[0].endswith(".py") else command


def _relay(stream, out, prefix: bytes, lock: threading.Lock) -> None:
    """Copy a worker's output to ours line by line, each line prefixed with the worker's name."""
    for line in iter(stream.readline, b""):
        with lock:
            out.write(prefix + line if line.endswith(b"\n") else prefix + line + b"\n")
            out.flush()
    stream.close()


def describe_status(status: int) -> str:
    if status < 0:
        return f"was killed by {signal.Signals(-status).name}"
    return f"exited with status {status}"


def report_failure(index: int, status: int, what_followed: str) -> int:
    """The one error line naming the failed worker; returns the job's exit status."""
    print(f"error: worker {index} {describe_status(status)}{what_followed} (its output is above, prefixed "
          f"[worker {index}])", file=sys.stderr)
    return shell_status(status)


def shell_status(status: int) -> int:
    """A Popen return code as a shell reports it (killed by signal s: 128 + s)."""
    return 128 - status if status < 0 else status


class Workers:
    """The N worker processes, their output relays, and the signals sent to them."""

    def __init__(self):
        self.processes: list[subprocess.Popen] = []
        self.relays: list[threading.Thread] = []

    def start(self, command: list[str], count: int) -> None:
        addresses = [f"{LOOPBACK}:{port}" for port in free_ports(count)]
        lock = threading.Lock()
        for index in range(count):
            env = dict(os.environ, TF_CONFIG=tf_config(addresses, index), PYTHONUNBUFFERED="1")
            # Own process group: a terminal's Ctrl-C reaches the launcher only, which forwards it once.
            process = subprocess.Popen(worker_command(command), env=env, stdout=subprocess.PIPE,
                                       stderr=subprocess.PIPE, process_group=0)
            self.processes.append(process)
            prefix = f"[worker {index}] ".encode()
            for stream, out in ((process.stdout, sys.stdout.buffer), (process.stderr, sys.stderr.buffer)):
                relay = threading.Thread(target=_relay, args=(stream, out, prefix, lock), daemon=True)
                relay.start()
                self.relays.append(relay)

    def signal_all(self, signum: int) -> None:
        for process in self.processes:
            if process.poll() is None:
                try:
                    process.send_signal(signum)
                except ProcessLookupError:
                    pass

    def first_failure(self) -> int | None:
        """The index of a worker that exited with a non-zero status, if any."""
        for index, process in enumerate(self.processes):
            if process.poll() not in (None, 0):
                return index
        return None

    def running(self) -> bool:
        return any(process.poll() is None for process in self.processes)

    def stop(self, grace_seconds: float) -> None:
        """SIGTERM the workers still running, SIGKILL those left after `grace_seconds`."""
        self.signal_all(signal.SIGTERM)
        deadline = time.monotonic() + grace_seconds
        while self.running() and time.monotonic() < deadline:
            time.sleep(0.1)
        self.signal_all(signal.SIGKILL)
        for process in self.processes:
            process.wait()

    def finish_output(self) -> None:
        for relay in self.relays:
            relay.join(timeout=5)


def run(command: list[str], count: int, grace_seconds: float) -> int:
    """Start `count` workers of `command`, wait for them; the job's exit status."""
    received: list[int] = []

    def forward(signum, frame):
        received.append(signum)
        workers.signal_all(signum if len(received) == 1 else signal.SIGKILL)    # a second one: no waiting

    workers = Workers()
    previous = {signum: signal.signal(signum, forward) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        workers.start(command, count)      # a signal during the start reaches the workers started so far
        while workers.running():
            failed = workers.first_failure()
            if failed is not None and not received:
                status = workers.processes[failed].returncode
                workers.stop(grace_seconds)
                workers.finish_output()
                return report_failure(failed, status, "; stopped the other workers")
            time.sleep(0.1)
    finally:
        for signum, action in previous.items():
            signal.signal(signum, action)
    workers.finish_output()
    if received:       # the workers were asked to save and stop: 130 (SIGINT) or 143 (SIGTERM) is expected
        expected = (0, 128 + received[0])
        for index, process in enumerate(workers.processes):
            if shell_status(process.returncode) not in expected:
                return report_failure(index, process.returncode, f" while stopping on {signal.Signals(received[0]).name}")
        return 128 + received[0]
    failed = workers.first_failure()
    if failed is not None:
        return report_failure(failed, workers.processes[failed].returncode, "")
    return 0


def main(argv: list[str] | None = None) -> int:
    args, command = parse_args(sys.argv[1:] if argv is None else list(argv))
    try:
        return run(command, args.workers, args.grace_seconds)
    except FileNotFoundError as err:
        print(f"error: cannot start the workers' command: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
