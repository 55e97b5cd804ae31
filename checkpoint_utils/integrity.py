"""Whether a checkpoint's files are whole, and which checkpoint of a directory to use.

A TF checkpoint `P` is an index `P.index` (a table: for every tensor its data shard, byte
offset and size) and data shards `P.data-<i>-of-<n>`. A copy cut short, a shard or index that
went missing, or a `checkpoint` state file naming a checkpoint whose files are gone are found
here from the index alone, without reading a tensor: a checkpoint of 6B weights plus Adam's
slots is ~72 GB, and the restore that follows reads it once.

A directory's checkpoints are tried newest first (`checkpoints_newest_first`); a broken one is
skipped with a warning naming it and what is wrong, and a directory that holds checkpoint
files of which none is whole is refused (`CorruptCheckpointError`) rather than treated as
empty: training would otherwise start from scratch over a run's checkpoints.
"""
from __future__ import annotations

import os
import re
import sys
from typing import Callable

import tensorflow as tf
from google.protobuf.message import DecodeError
from tensorflow.core.protobuf import tensor_bundle_pb2

STATE_FILE = "checkpoint"
_DATA_FILE = re.compile(r"^(?P<prefix>.+)\.data-(?P<shard>\d{5})-of-(?P<shards>\d{5})$")
_TABLE_MAGIC = 0xDB4775248B80FB57        # the last 8 bytes of a TF table (the index's format)
_TABLE_FOOTER = 48                       # two block handles padded to 40 bytes, then the magic
# The error codes of a read that found the checkpoint's bytes missing, short or corrupted. TF's
# Python checkpoint reader reports a checksum mismatch as code UNKNOWN: its message tells.
_DATA_ERROR_CODES = (tf.errors.DATA_LOSS, tf.errors.OUT_OF_RANGE, tf.errors.NOT_FOUND)
_DATA_ERROR_MESSAGE = re.compile(r"checksum|corrupt|truncated|less bytes than requested", re.IGNORECASE)


class CorruptCheckpointError(ValueError):
    """A checkpoint's files are missing, cut short or unreadable."""


class _UnknownTableFormat(Exception):
    """The index uses a table feature this reader does not parse (block compression)."""


# ---- the index: where each tensor's bytes are ------------------------------------------------

def _varint(buffer: bytes, position: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if position >= len(buffer) or shift > 63:
            raise ValueError("a length field runs past its block")
        byte = buffer[position]
        position += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, position
        shift += 7


def _block_handle(buffer: bytes, position: int = 0) -> tuple[int, int, int]:
    offset, position = _varint(buffer, position)
    size, position = _varint(buffer, position)
    return offset, size, position


def _block_entries(table: bytes, offset: int, size: int):
    """(key, value) of one table block: prefix-compressed keys, then the restart array and its
    count; each block is followed by a compression byte and a CRC."""
    if offset + size + 5 > len(table):
        raise ValueError("a block runs past the end of the file")
    if table[offset + size] != 0:
        raise _UnknownTableFormat()
    block = table[offset:offset + size]
    restarts = int.from_bytes(block[-4:], "little")
    end = len(block) - 4 - 4 * restarts
    if end < 0:
        raise ValueError("a block's restart array is longer than the block")
    position, key = 0, b""
    while position < end:
        shared, position = _varint(block, position)
        unshared, position = _varint(block, position)
        length, position = _varint(block, position)
        key = key[:shared] + block[position:position + unshared]
        position += unshared
        yield key, block[position:position + length]
        position += length


def index_extents(index_path: str) -> tuple[int, dict[int, int]]:
    """(number of data shards, {shard: bytes its tensors need}) from a checkpoint's index.
    Raises ValueError when the index is not a whole table, _UnknownTableFormat when it uses
    block compression (TF writes checkpoint indexes uncompressed)."""
    with open(index_path, "rb") as f:
        table = f.read()
    if len(table) < _TABLE_FOOTER or int.from_bytes(table[-8:], "little") != _TABLE_MAGIC:
        raise ValueError("it does not end in a table footer: cut short or not an index")
    footer = table[-_TABLE_FOOTER:]
    _, _, position = _block_handle(footer)                       # the meta index: unused
    index_offset, index_size, _ = _block_handle(footer, position)
    shards, needed = None, {}
    try:
        for _, handle in _block_entries(table, index_offset, index_size):
            offset, size, _ = _block_handle(handle)
            for key, value in _block_entries(table, offset, size):
                if key == b"":
                    shards = tensor_bundle_pb2.BundleHeaderProto.FromString(value).num_shards
                    continue
                entry = tensor_bundle_pb2.BundleEntryProto.FromString(value)
                needed[entry.shard_id] = max(needed.get(entry.shard_id, 0), entry.offset + entry.size)
    except DecodeError as err:
        raise ValueError(f"an entry does not parse ({err})") from None
    if shards is None:
        raise ValueError("it has no header entry")
    return shards, needed


def checkpoint_problem(prefix: str) -> str | None:
    """What is wrong with the files of the checkpoint at `prefix` ("its data file X is cut
    short ..."), or None when they are whole as far as the index tells (no tensor is read)."""
    directory, name = os.path.split(prefix)
    index = prefix + ".index"
    if not os.path.exists(index):
        has_data = any(_prefix_of(file) == name for file in _listdir(directory))
        return f"its index {name}.index is missing" if has_data else "none of its files exist"
    try:
        shards, needed = index_extents(index)
    except ValueError as err:
        return f"its index {name}.index is damaged ({err})"
    except _UnknownTableFormat:
        shards, needed = None, {}
    try:
        tf.train.load_checkpoint(prefix)             # TF's own reading of the index (block checksums)
    except tf.errors.OpError as err:
        return f"its index {name}.index is unreadable ({_first_line(err)})"
    for shard in range(shards or 0):
        data = f"{name}.data-{shard:05d}-of-{shards:05d}"
        path = os.path.join(directory, data)
        if not os.path.exists(path):
            return f"its data file {data} is missing"
        size = os.path.getsize(path)
        if size < needed.get(shard, 0):
            return f"its data file {data} is cut short ({size:,} bytes; its index needs {needed[shard]:,})"
    return None


def is_data_error(err: BaseException) -> bool:
    """Whether an error raised while reading a checkpoint says its bytes are missing, short or
    corrupted (a checksum mismatch), rather than anything else (out of memory, a bug)."""
    if isinstance(err, IndexError):          # TF's checkpoint reader: "Read less bytes than requested"
        return True
    if not isinstance(err, tf.errors.OpError):
        return False
    return err.error_code in _DATA_ERROR_CODES or (err.error_code == tf.errors.UNKNOWN
                                                   and bool(_DATA_ERROR_MESSAGE.search(err.message or "")))


# ---- a directory's checkpoints ---------------------------------------------------------------

def _listdir(directory: str) -> list[str]:
    try:
        return sorted(os.listdir(directory or "."))
    except (FileNotFoundError, NotADirectoryError):
        return []


def _prefix_of(file: str) -> str | None:
    if file.endswith(".index"):
        return file[:-len(".index")]
    found = _DATA_FILE.match(file)
    return found["prefix"] if found else None


def _step(prefix: str) -> int:
    found = re.search(r"-(\d+)$", prefix)
    return int(found.group(1)) if found else -1


def checkpoint_files(directory: str) -> list[str]:
    """Names of the files in `directory` that belong to checkpoints: indexes, data shards and the
    `checkpoint` state file."""
    return [file for file in _listdir(directory) if file == STATE_FILE or _prefix_of(file) is not None]


def checkpoints_newest_first(directory: str) -> list[str]:
    """The checkpoint prefixes of `directory` in the order a resume tries them: the one the
    `checkpoint` state file names as latest (its files may be gone), then every older one the
    state file lists or the directory holds, newest first (a state file of an older TF may name
    absolute paths of the directory's former place: the files here come after them). Ones newer
    than the state file's latest are left out (a state file pointed back at an older checkpoint is
    obeyed). Without a readable state file: every checkpoint in the directory, newest first."""
    on_disk = {os.path.join(directory, p) for p in map(_prefix_of, _listdir(directory)) if p is not None}
    state = tf.train.get_checkpoint_state(directory) if os.path.isfile(os.path.join(directory, STATE_FILE)) else None
    if state is None or not state.model_checkpoint_path:
        return sorted(on_disk, key=_step, reverse=True)
    latest = state.model_checkpoint_path
    older = (on_disk | set(state.all_model_checkpoint_paths)) - {latest}
    return [latest] + sorted((p for p in older if _step(p) <= _step(latest)), key=_step, reverse=True)


def newest_whole_checkpoint(directory: str, fix: str, load: Callable[[str], None] | None = None
                            ) -> tuple[str | None, list[tuple[str, str]]]:
    """(the newest checkpoint of `directory` whose files are whole, [(newer prefix, what is wrong
    with it)]); with `load`, a checkpoint also counts as whole only once load(prefix) has read it
    without a data error (a checksum the index cannot show). (None, []) when the directory holds
    no checkpoint file. Raises CorruptCheckpointError, whose message ends with `fix`, when it
    holds checkpoint files but no whole checkpoint."""
    skipped = []
    for prefix in checkpoints_newest_first(directory):
        problem = checkpoint_problem(prefix)
        if problem is None and load is not None:
            try:
                load(prefix)
            except (tf.errors.OpError, IndexError) as err:
                if not is_data_error(err):
                    raise
                problem = f"its data cannot be read ({_first_line(err)})"
        if problem is None:
            return prefix, skipped
        skipped.append((prefix, problem))
    files = checkpoint_files(directory)
    if files:
        broken = "; ".join(f"{os.path.basename(p)}: {problem}" for p, problem in skipped) or "none is listed"
        shown = ", ".join(files[:8]) + (f" and {len(files) - 8} more" if len(files) > 8 else "")
        raise CorruptCheckpointError(f"{directory} holds checkpoint files ({shown}) but no whole checkpoint "
                                     f"({broken}); {fix}")
    return None, []


def warn_skipped(skipped: list[tuple[str, str]], chosen: str, note: str = "") -> None:
    """One `warning:` line on stderr: the checkpoints passed over for `chosen`, and why."""
    names = "; ".join(f"{os.path.basename(p)}: {problem}" for p, problem in skipped)
    plural = "s" if len(skipped) > 1 else ""
    print(f"warning: skipped unusable checkpoint{plural} in {os.path.dirname(chosen)} ({names}); using "
          f"{os.path.basename(chosen)}, the newest whole one. The skipped files are left in place{note}",
          file=sys.stderr, flush=True)


def _first_line(err: BaseException) -> str:
    message = getattr(err, "message", None) or str(err)
    message = re.sub(r"^\{\{function_node [^}]*\}\}\s*", "", message)        # TF's op wrapper prefix
    return message.strip().splitlines()[0] if message.strip() else type(err).__name__
