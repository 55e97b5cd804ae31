"""Writing numbered TFRecord shards atomically, and the progress log that lets a run resume.

A shard `{split}-{index:05d}.tfrecord` is written to `.{name}.tmp` and renamed into place
when it holds `shard_size` examples (or at the end), so a shard file that exists is whole.
After each rename a progress record `.progress/{name}.json` notes the shard's size and
where the input stream stands, so a re-run skips the shards already done and restarts
the reading right after them. `.progress/config.json` holds the settings that made the
shards; a re-run with other settings is refused rather than mixing outputs.
"""
from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass

from config.files import atomic_write_text
from input.errors import InputDataError

__all__ = ["ShardInfo", "ShardWriter", "ProgressLog", "shard_name", "write_json_atomic"]

SHARD_SUFFIX = ".tfrecord"


def shard_name(prefix: str, index: int) -> str:
    return f"{prefix}-{index:05d}{SHARD_SUFFIX}"


def write_json_atomic(path: str, data) -> None:
    atomic_write_text(path, json.dumps(data, indent=1, sort_keys=True))


@dataclass(frozen=True)
class ShardInfo:
    name: str
    examples: int
    bytes: int

    def to_dict(self) -> dict:
        return {"file": self.name, "examples": self.examples, "bytes": self.bytes}


class ShardWriter:
    """Writes serialized examples into shards of `shard_size`, each through a temp file + os.replace."""

    def __init__(self, directory: str, prefix: str, shard_size: int, first_index: int = 0):
        import tensorflow as tf  # imported here so the CLI's --help and the readers stay light

        self._tf = tf
        self.directory = directory
        self.prefix = prefix
        self.shard_size = shard_size
        self.index = first_index
        self._writer = None
        self._count = 0

    def _temp_path(self) -> str:
        return os.path.join(self.directory, f".{shard_name(self.prefix, self.index)}.tmp")

    def write(self, record: bytes) -> ShardInfo | None:
        """Add one record; returns the shard's info when this record completed it."""
        if self._writer is None:
            self._writer = self._tf.io.TFRecordWriter(self._temp_path())
        self._writer.write(record)
        self._count += 1
        return self.close() if self._count == self.shard_size else None

    def close(self) -> ShardInfo | None:
        """Finish the open shard (if any) and move it into place."""
        if self._writer is None:
            return None
        self._writer.close()
        name = shard_name(self.prefix, self.index)
        final = os.path.join(self.directory, name)
        os.replace(self._temp_path(), final)
        info = ShardInfo(name, self._count, os.path.getsize(final))
        self._writer, self._count = None, 0
        self.index += 1
        return info

    def abort(self) -> None:
        """Drop the open shard's temp file (after an error or interrupt)."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
            if os.path.exists(self._temp_path()):
                os.unlink(self._temp_path())


class ProgressLog:
    """The `.progress/` folder of one split directory."""

    def __init__(self, directory: str):
        self.directory = directory
        self.folder = os.path.join(directory, ".progress")

    def check_settings(self, settings: dict, overwrite: bool) -> None:
        """Refuse to mix outputs of different settings; start afresh when asked to."""
        config_path = os.path.join(self.folder, "config.json")
        existing_shards = glob.glob(os.path.join(self.directory, f"*{SHARD_SUFFIX}"))
        if overwrite:
            self.clear()
        elif os.path.isfile(config_path):
            with open(config_path, encoding="utf-8") as f:
                old = json.load(f)
            if old != settings:
                key = next(k for k in sorted(set(old) | set(settings)) if old.get(k) != settings.get(k))
                raise InputDataError(
                    f"{self.directory} holds shards made with other settings ({key}: {old.get(key)!r} "
                    f"then, {settings.get(key)!r} now); pass --overwrite to replace them or choose "
                    "another --output-dir")
        elif existing_shards:
            raise InputDataError(
                f"{self.directory} already holds {len(existing_shards)} .tfrecord files not written by "
                "this tool (no .progress/config.json); pass --overwrite to replace them or choose "
                "another --output-dir")
        os.makedirs(self.folder, exist_ok=True)
        write_json_atomic(config_path, settings)
        for stale in glob.glob(os.path.join(self.directory, ".*.tmp")):
            os.unlink(stale)       # a shard left half-written by an interrupted run

    def clear(self) -> None:
        for path in glob.glob(os.path.join(self.directory, f"*{SHARD_SUFFIX}")) + \
                glob.glob(os.path.join(self.folder, "*.json")) + [os.path.join(self.directory, "stats.json")]:
            if os.path.exists(path):
                os.unlink(path)

    def record(self, info: ShardInfo, next_start: dict | None, state: dict) -> None:
        write_json_atomic(os.path.join(self.folder, info.name + ".json"),
                          {**info.to_dict(), "next": next_start, "state": state})

    def resume_point(self, prefix: str) -> tuple[list[dict], dict | None]:
        """(records of the leading finished shards, record to resume after or None to start afresh).

        A shard counts as finished when its file exists with the size its record notes; the
        first one that does not breaks the chain, and its record and later ones are removed.
        """
        done: list[dict] = []
        index = 0
        while True:
            name = shard_name(prefix, index)
            record_path = os.path.join(self.folder, name + ".json")
            shard_path = os.path.join(self.directory, name)
            if not os.path.isfile(record_path):
                break
            with open(record_path, encoding="utf-8") as f:
                record = json.load(f)
            if not os.path.isfile(shard_path) or os.path.getsize(shard_path) != record["bytes"]:
                break
            done.append(record)
            index += 1
        for stale in sorted(glob.glob(os.path.join(self.folder, f"{prefix}-*{SHARD_SUFFIX}.json"))):
            if os.path.basename(stale)[:-len(".json")] not in {r["file"] for r in done}:
                os.unlink(stale)
        return done, (done[-1] if done else None)
