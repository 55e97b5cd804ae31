"""Finding and checking the TFRecord shards of a `data_dir` before tf.data reads them.

Errors raised inside tf.data surface at iteration time without a file name, so every
shard is checked here first, in plain Python, and problems are reported naming the file:
an empty or missing directory, a truncated or garbled file (framing walk of
`records.scan_tfrecord`), a file whose size or record count differs from the `stats.json`
preprocessing wrote or that stats.json lists but is gone (a file cut exactly at a record
border passes the framing walk: only stats.json tells), and a first record with a missing
feature, another sequence length or a token id the model cannot embed. With
`skip_corrupt_records` the damage becomes a warning that counts the records lost. The
exact record count of every file comes out of this too; the input pipeline uses it to skip
whole epochs when resuming.

Cost: with a matching `stats.json` a file costs one header read; without, one header read
per record (no payloads), which is seconds for thousands of shards.
"""
from __future__ import annotations

import glob
import json
import logging
import os
import struct
from dataclasses import dataclass
from typing import Sequence

from input.errors import InputDataError
from input.records import FEATURE_NAMES, masked_crc32c, read_record, scan_tfrecord

__all__ = ["ShardFile", "index_shards", "check_example"]

log = logging.getLogger(__name__)
SHARD_PATTERNS = ("*.tfrecord", "*.tfrecords")
_PREPROCESS_HINT = "python -m input.scripts.pile.preprocess"


@dataclass(frozen=True)
class ShardFile:
    path: str
    records: int       # records tf.data will read (the readable prefix when skipping corruption)


def check_example(path: str, serialized: bytes, seq_len: int, vocab_size: int, key: str) -> None:
    """Raise InputDataError (naming `path`) unless `serialized` is an Example the model can train on."""
    import tensorflow as tf

    try:
        example = tf.train.Example.FromString(serialized)
    except Exception as err:      # protobuf's DecodeError
        raise InputDataError(f"{path}: the first record is not a tf.train.Example ({err}); the files in "
                             f"{key}.data_dir must come from {_PREPROCESS_HINT}") from None
    features = example.features.feature
    for name in FEATURE_NAMES:
        if name not in features:
            raise InputDataError(
                f"{path}: the first record has no feature {name!r} (it has {sorted(features)}); "
                f"expected {list(FEATURE_NAMES)} as written by {_PREPROCESS_HINT}")
        feature = features[name]
        if feature.WhichOneof("kind") != "int64_list":
            raise InputDataError(f"{path}: feature {name!r} holds {feature.WhichOneof('kind')}, not int64_list; "
                                 f"rewrite the data with {_PREPROCESS_HINT}")
        values = feature.int64_list.value
        if len(values) != seq_len:
            raise InputDataError(
                f"{path}: feature {name!r} has {len(values)} tokens per record but "
                f"{key}.max_sequence_length={seq_len}; set {key}.max_sequence_length: {len(values)} or "
                f"re-run preprocessing with --max-sequence-length {seq_len}")
        if name != "input_mask" and values and (max(values) >= vocab_size or min(values) < 0):
            bad = max(values) if max(values) >= vocab_size else min(values)
            raise InputDataError(
                f"{path}: token id {bad} in {name!r} is outside model.vocab_size={vocab_size}; the data was "
                "made with another tokenizer: re-run preprocessing with the model's tokenizer or raise "
                "model.vocab_size")


@dataclass(frozen=True)
class _Recorded:
    """What stats.json says of one shard file."""
    stats_path: str
    examples: int
    bytes: int


def _stats_sizes(directory: str) -> dict[str, _Recorded]:
    """{file name: what stats.json records of it}; empty when preprocessing left no stats.json."""
    path = os.path.join(directory, "stats.json")
    if not os.path.exists(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            shards = json.load(f)["shards"]
        return {s["file"]: _Recorded(path, int(s["examples"]), int(s["bytes"])) for s in shards}
    except (OSError, ValueError, KeyError, TypeError) as err:
        log.warning("%s is unreadable (%s: %s); the shard files are checked without it", path,
                    type(err).__name__, err)
        return {}


def _first_record_span(path: str) -> tuple[int, int] | None:
    """(offset, length) of the first payload, reading one header; None when the header is bad."""
    with open(path, "rb") as f:
        header = f.read(12)
    if len(header) < 12:
        return None
    length, crc = struct.unpack("<QI", header)
    return (12, length) if masked_crc32c(header[:8]) == crc else None


def _damaged(message: str, fix: str, kept: str, lost: int | None, skip_corrupt: bool, key: str) -> None:
    """Raise `message; fix`, naming skip_corrupt_records; with it set, warn and count what is lost."""
    if not skip_corrupt:
        raise InputDataError(f"{message}; {fix}, or set {key}.skip_corrupt_records: true to read {kept}")
    log.warning("%s; skip_corrupt_records is set: reading %s%s", message, kept,
                f" ({lost} records missing)" if lost is not None and lost > 0 else "")


def _index_file(path: str, known: _Recorded | None, skip_corrupt: bool, key: str
                ) -> tuple[int, tuple[int, int] | None]:
    """(readable records, span of the first record) of one file, raising on damage unless skipping."""
    size = os.path.getsize(path)
    if known is not None and known.bytes == size:
        first = _first_record_span(path) if known.examples else None
        if first is not None or known.examples == 0:
            return known.examples, first
    scan = scan_tfrecord(path)
    rewrite = "re-run preprocessing to rewrite it (finished shards are kept), delete it"
    lost = known.examples - scan.records if known is not None else None
    if scan.problem is not None:
        _damaged(f"{path} is {scan.problem}", rewrite, f"its {scan.records} good records", lost, skip_corrupt, key)
    elif known is not None:        # whole records, but not the ones preprocessing wrote
        _damaged(f"{path} holds {scan.records} records ({size} bytes) but {known.stats_path} records "
                 f"{known.examples} ({known.bytes} bytes): the file was cut or replaced after preprocessing",
                 rewrite, f"the {scan.records} records it holds", lost, skip_corrupt, key)
    first = (scan.first_record_offset, scan.first_record_length) if scan.records else None
    return scan.records, first


def _check_listed_files_exist(known: dict[str, _Recorded], present: list[str],
                              skip_corrupt: bool, key: str) -> None:
    """A shard stats.json lists that is gone is lost data, not a smaller data set."""
    names = {os.path.basename(p) for p in present}
    for name, recorded in sorted(known.items()):
        if name not in names and recorded.examples:
            _damaged(f"{recorded.stats_path} lists {name} ({recorded.examples} records) but the file is missing",
                     "restore it or re-run preprocessing (finished shards are kept)", "the other files",
                     recorded.examples, skip_corrupt, key)


def index_shards(data_dirs: Sequence[str], *, seq_len: int, vocab_size: int, skip_corrupt: bool,
                 key: str) -> list[ShardFile]:
    """The checked shards of `data_dirs` in a stable order; `key` (e.g. "train_input") names the params."""
    shards: list[ShardFile] = []
    for directory in data_dirs:
        if not os.path.isdir(directory):
            raise InputDataError(f"{key}.data_dir {directory} is not a directory; create the TFRecords with "
                                 f"{_PREPROCESS_HINT} or fix the path")
        paths = sorted({p for pattern in SHARD_PATTERNS for p in glob.glob(os.path.join(directory, pattern))})
        if not paths:
            raise InputDataError(f"{key}.data_dir {directory} holds no *.tfrecord files; create them with "
                                 f"{_PREPROCESS_HINT} --output-dir ... or fix the path")
        known = _stats_sizes(directory)
        _check_listed_files_exist(known, paths, skip_corrupt, key)
        for path in paths:
            records, first = _index_file(path, known.get(os.path.basename(path)), skip_corrupt, key)
            if first is None:
                log.warning("%s holds no readable records; it adds nothing", path)
                continue
            check_example(path, read_record(path, *first), seq_len, vocab_size, key)
            shards.append(ShardFile(path, records))
    if not shards:
        raise InputDataError(f"{key}.data_dir {', '.join(data_dirs)}: no readable records in any file")
    return shards
