"""Finding and checking the TFRecord shards of a `data_dir` before tf.data reads them.

Errors raised inside tf.data surface at iteration time without a file name, so every
shard is checked here first, in plain Python, and problems are reported naming the file:
an empty or missing directory, a truncated or garbled file (framing walk of
`records.scan_tfrecord`, or a size that differs from the `stats.json` preprocessing
wrote), and a first record with a missing feature, another sequence length or a token id
the model cannot embed. The exact record count of every file comes out of this too; the
input pipeline uses it to skip whole epochs when resuming.

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


def _stats_sizes(directory: str) -> dict[str, tuple[int, int]]:
    """{file name: (examples, bytes)} from the stats.json preprocessing leaves, if any."""
    path = os.path.join(directory, "stats.json")
    try:
        with open(path, encoding="utf-8") as f:
            shards = json.load(f)["shards"]
        return {s["file"]: (int(s["examples"]), int(s["bytes"])) for s in shards}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def _first_record_span(path: str) -> tuple[int, int] | None:
    """(offset, length) of the first payload, reading one header; None when the header is bad."""
    with open(path, "rb") as f:
        header = f.read(12)
    if len(header) < 12:
        return None
    length, crc = struct.unpack("<QI", header)
    return (12, length) if masked_crc32c(header[:8]) == crc else None


def _index_file(path: str, known: tuple[int, int] | None, skip_corrupt: bool, key: str
                ) -> tuple[int, tuple[int, int] | None]:
    """(readable records, span of the first record) of one file, raising on damage unless skipping."""
    if known is not None and known[1] == os.path.getsize(path):
        first = _first_record_span(path) if known[0] else None
        if first is not None or known[0] == 0:
            return known[0], first
    scan = scan_tfrecord(path)
    if scan.problem is not None:
        if not skip_corrupt:
            raise InputDataError(
                f"{path} is {scan.problem}; re-run preprocessing to rewrite it (finished shards are kept), "
                f"delete it, or set {key}.skip_corrupt_records: true to read its {scan.records} good records")
        log.warning("%s: %s; skip_corrupt_records is set, reading its %d good records and skipping the rest",
                    path, scan.problem, scan.records)
    first = (scan.first_record_offset, scan.first_record_length) if scan.records else None
    return scan.records, first


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
