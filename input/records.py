"""The TFRecord format of the pipeline: feature names, Example encoding, and file checks.

Each record is a `tf.train.Example` with three int64 features of length S
(`max_sequence_length`): `input_ids`, `labels` and `input_mask`; their meaning is defined
once, in docs/data.md (and the preprocess module docstring).

Examples are encoded here by hand (protobuf varints with NumPy) rather than through
`tf.train.Example`, because the packed token payload of a window is then a slice of the
encoded token stream and preprocessing spends its time tokenizing, not serializing. The
encoding is checked against `tf.train.Example` parsing in the tests.

`scan_tfrecord` walks the record framing (length, length CRC, payload, payload CRC)
without reading payloads, so the processor can count records and catch a truncated or
garbled file up front, naming it, instead of failing later inside tf.data.
"""
from __future__ import annotations

import functools
import os
import struct
from dataclasses import dataclass

import numpy as np

__all__ = ["FEATURE_NAMES", "encode_varints", "varint_offsets", "serialize_example", "serialize_payloads",
           "RecordScan", "scan_tfrecord", "read_record", "masked_crc32c"]

FEATURE_NAMES = ("input_ids", "input_mask", "labels")


def encode_varints(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Protobuf varint bytes of non-negative `values` and each value's byte offset.

    Returns (encoded uint8 [total_bytes], offsets int64 [n + 1]): value i occupies
    encoded[offsets[i]:offsets[i + 1]], 7 bits per byte, low bits first, the high bit
    set on every byte but the last.
    """
    values = np.asarray(values).ravel().astype(np.int64, copy=False)
    if values.size and int(values.min()) < 0:
        raise ValueError("encode_varints takes non-negative values")
    width = max(1, -(-int(values.max() if values.size else 0).bit_length() // 7))   # bytes of the largest
    lengths = np.ones(values.size, dtype=np.int64)                                   # [n]
    for k in range(1, width):
        lengths += values >= (1 << (7 * k))
    offsets = np.zeros(values.size + 1, dtype=np.int64)                              # [n + 1]
    np.cumsum(lengths, out=offsets[1:])
    encoded = np.empty(int(offsets[-1]), dtype=np.uint8)
    for byte in range(width):           # byte k of every value that has one
        has = np.flatnonzero(lengths > byte) if byte else slice(None)
        group = (values[has] >> (7 * byte)) & 0x7F
        encoded[offsets[:-1][has] + byte] = (group | ((lengths[has] > byte + 1) << 7)).astype(np.uint8)
    return encoded, offsets


def varint_offsets(encoded: np.ndarray) -> np.ndarray:
    """The offsets [n + 1] of `encode_varints`, recovered from its bytes: a value ends at each byte
    whose high (continuation) bit is clear. Cheaper to recompute than to send between processes."""
    encoded = np.asarray(encoded, dtype=np.uint8)
    ends = np.flatnonzero(encoded < 0x80)                                         # [n]
    offsets = np.zeros(len(ends) + 1, dtype=np.int64)                              # [n + 1]
    offsets[1:] = ends + 1
    return offsets


def _varint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


# Protobuf tags (field number << 3 | wire type 2, length-delimited) of the fields on the path
# Example.features -> Features.feature (map entry: key, value) -> Feature.int64_list -> Int64List.value.
_TAG_FEATURES = _TAG_ENTRY = _TAG_KEY = _TAG_VALUES = b"\x0a"
_TAG_ENTRY_VALUE, _TAG_INT64_LIST = b"\x12", b"\x1a"


@functools.lru_cache(maxsize=1 << 14)
def _feature_entry_head(name: str, packed_length: int) -> bytes:
    """The bytes before `packed` in one `features` map entry holding an Int64List (payload not copied).

    Cached: records of one run repeat a few thousand payload lengths at most.
    """
    key = name.encode()
    values_head = _TAG_VALUES + _varint(packed_length)
    list_length = len(values_head) + packed_length
    list_head = _TAG_INT64_LIST + _varint(list_length)
    feature_length = len(list_head) + list_length
    key_part = _TAG_KEY + _varint(len(key)) + key
    value_head = _TAG_ENTRY_VALUE + _varint(feature_length)
    entry_length = len(key_part) + len(value_head) + feature_length
    return b"".join([_TAG_ENTRY, _varint(entry_length), key_part, value_head, list_head, values_head])


def serialize_payloads(input_ids: bytes, input_mask: bytes, labels: bytes) -> bytes:
    """A serialized Example from the packed varint bytes of its three features (any bytes-like)."""
    parts = []
    for name, packed in zip(FEATURE_NAMES, (input_ids, input_mask, labels)):
        parts += (_feature_entry_head(name, len(packed)), packed)
    features_length = sum(len(p) for p in parts)
    return b"".join([_TAG_FEATURES, _varint(features_length), *parts])


def serialize_example(input_ids, labels, input_mask) -> bytes:
    """A serialized Example from three int arrays of equal length."""
    return serialize_payloads(encode_varints(input_ids)[0].tobytes(),
                              encode_varints(input_mask)[0].tobytes(),
                              encode_varints(labels)[0].tobytes())


def _crc32c_table() -> list[int]:
    table = []
    for n in range(256):
        crc = n
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
        table.append(crc)
    return table


_CRC_TABLE = _crc32c_table()


def masked_crc32c(data: bytes) -> int:
    """TFRecord's masked CRC-32C; pure Python, used on the 8-byte length headers only."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _CRC_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    crc ^= 0xFFFFFFFF
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


@dataclass(frozen=True)
class RecordScan:
    """What the framing walk of one file found."""
    path: str
    size: int
    records: int                 # well-framed records before any problem
    first_record_offset: int     # byte offset of the first payload (-1 if none)
    first_record_length: int
    problem: str | None          # None when the file ends exactly after its last record


def scan_tfrecord(path: str) -> RecordScan:
    """Walk the record headers of `path`: count records, check length CRCs, detect truncation."""
    size = os.path.getsize(path)
    records, position = 0, 0
    first = (-1, 0)
    problem = None
    with open(path, "rb") as f:
        while position < size:
            header = f.read(12)
            if len(header) < 12:
                problem = f"truncated: {size - position} stray bytes after record {records}"
                break
            length, length_crc = struct.unpack("<QI", header)
            if masked_crc32c(header[:8]) != length_crc:
                problem = (f"corrupt header of record {records} at byte {position} "
                           "(length checksum mismatch; not a TFRecord file?)")
                break
            end = position + 12 + length + 4
            if end > size:
                problem = (f"truncated: record {records} at byte {position} needs {12 + length + 4} "
                           f"bytes, only {size - position} remain")
                break
            if records == 0:
                first = (position + 12, length)
            records += 1
            position = end
            f.seek(position)
    return RecordScan(path, size, records, first[0], first[1], problem)


def read_record(path: str, offset: int, length: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)
