"""Guards of a training run's model_dir: one writer at a time, and no silent change of model.

The lock is `model_dir/.lock`, held with `fcntl.flock` for the life of the training process
and holding who took it (pid, host, start time). The kernel drops a flock when its process
dies however it dies (SIGKILL, OOM), so a lock file whose flock is free was left by a dead
run: it is taken over, and said so. flock is advisory and per host; on a network file system
shared by several hosts it may not exclude a run on another host (see docs/runtime.md).
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import time

import yaml

from config.params import ModelParams, Params, ParamsError
from config.schema import from_dict, to_dict
from runtime.logging_utils import log

LOCK_NAME = ".lock"


class RunDirLockedError(RuntimeError):
    """Another live process trains in this model_dir."""


class ModelDirLock:
    """`with ModelDirLock(model_dir):` excludes a second training in the same model_dir."""

    def __init__(self, model_dir: str):
        self.model_dir = model_dir
        self.path = os.path.join(model_dir, LOCK_NAME)
        self._file = None
        self._created_dir = False

    def _acquire(self):
        """An open lock file holding the flock, checked to still be the file at self.path (a run
        that finished may have unlinked the one we opened)."""
        while True:
            handle = open(self.path, "a+", encoding="utf-8")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = _describe(_read_holder(handle))
                handle.close()
                raise RunDirLockedError(
                    f"model_dir {self.model_dir} is in use by another training ({holder}); wait for it to "
                    "finish or stop it, or use another --model-dir") from None
            try:
                if os.stat(self.path).st_ino == os.fstat(handle.fileno()).st_ino:
                    return handle
            except FileNotFoundError:
                pass
            handle.close()

    def __enter__(self) -> "ModelDirLock":
        self._created_dir = not os.path.isdir(self.model_dir)
        os.makedirs(self.model_dir, exist_ok=True)
        try:
            handle = self._acquire()
        except BaseException:
            self._remove_created_dir()
            raise
        previous = _read_holder(handle)
        if previous:
            log(f"taking over the lock of model_dir {os.path.dirname(self.path)} left by a run that is gone "
                f"({_describe(previous)})")
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                 "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}) + "\n")
        handle.flush()
        self._file = handle
        return self

    def __exit__(self, *exc) -> None:
        if self._file is not None:
            os.unlink(self.path)           # while still held: a waiting opener re-checks the inode
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None
        self._remove_created_dir()

    def _remove_created_dir(self) -> None:
        """A run that failed before writing anything leaves no empty model_dir behind."""
        if self._created_dir:
            try:
                os.rmdir(self.model_dir)
            except OSError:                # not empty: the run wrote its files
                pass


def _read_holder(handle) -> dict | None:
    handle.seek(0)
    text = handle.read().strip()
    try:
        return json.loads(text) if text else None
    except json.JSONDecodeError:
        return {"unreadable": text[:80]}


def _describe(holder: dict | None) -> str:
    if not holder:
        return "holder unknown"
    if "unreadable" in holder:
        return f"lock file holds {holder['unreadable']!r}"
    return f"pid {holder.get('pid')} on host {holder.get('host')}, started {holder.get('started')}"


def check_same_model(params: Params, model_dir: str) -> None:
    """A training run may not change the `model:` section of the params.yaml already in model_dir:
    its checkpoints are of that model. Raises ParamsError naming the differing keys."""
    path = os.path.join(model_dir, "params.yaml")
    if not os.path.isfile(path):
        return
    try:
        with open(path, encoding="utf-8") as f:
            existing = (yaml.safe_load(f) or {}).get("model")
    except (OSError, yaml.YAMLError, AttributeError) as err:
        raise ParamsError(f"{path} cannot be read ({err}); it records the model this model_dir trains: "
                          "repair it or use another --model-dir") from None
    if not isinstance(existing, dict):
        return
    try:    # through the schema, so a renamed key of an older file reads as today's name
        recorded = to_dict(from_dict(ModelParams, existing, "model"))
    except ParamsError as err:
        raise ParamsError(f"{path}: {err}; it records the model this model_dir trains: repair it or use "
                          "another --model-dir") from None
    differing = _differences(recorded, to_dict(params.model), "model")
    if differing:
        shown = "; ".join(f"{key}: {old!r} in {path}, {new!r} now" for key, old, new in differing[:4])
        more = f" (and {len(differing) - 4} more)" if len(differing) > 4 else ""
        raise ParamsError(f"model_dir {model_dir} trains another model: {shown}{more}. Use a new --model-dir "
                          f"(warm start from this one with --checkpoint-path {model_dir}), or pass {path}")


def _differences(old, new, path: str) -> list[tuple[str, object, object]]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new)):
            out += _differences(old.get(key), new.get(key), f"{path}.{key}")
        return out
    return [] if old == new else [(path, old, new)]
