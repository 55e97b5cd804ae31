"""Small data builders shared by the tests: a tiny corpus, a tiny tokenizer, tiny TFRecords.

Everything is made in the caller's directory from text in this file, so no test needs the
network or the GPT-2 files. Other test modules (runtime, demo) import these too.
"""
from __future__ import annotations

import json
import os
import random
import struct
from typing import Sequence

import numpy as np
import zstandard

from input.records import serialize_example
from input.scripts.train_tokenizer import train_tokenizer
from input.tokenizer import GptTokenizer

__all__ = ["SAMPLE_TEXT", "make_tiny_tokenizer", "make_documents", "write_jsonl_zst", "write_jsonl",
           "make_tiny_corpus", "make_tiny_tfrecords", "example_tokens", "make_tiny_preprocessed",
           "write_stats_json", "cut_at_record_border"]

SAMPLE_TEXT = """\
The quick brown fox jumps over the lazy dog. A tokenizer splits text into pieces.
def add(a, b):
    return a + b

class Counter:
    def __init__(self):
        self.count = 0
Numbers like 12345 and 3.14159 appear in code, and so do names_with_underscores.
Unicode too: café, naïve, 東京, emoji 🙂, and tabs\tand newlines.
"""

_WORDS = ("data", "model", "token", "window", "shard", "label", "input", "mask", "layer", "attention",
          "the", "a", "of", "and", "to", "in", "is", "for", "return", "def", "class", "self", "value")


def make_tiny_tokenizer(directory: str, vocab_size: int = 320) -> GptTokenizer:
    """A GPT-2 style byte-level BPE trained on SAMPLE_TEXT and the word list; EOS is `<|endoftext|>`."""
    texts = [SAMPLE_TEXT] * 3 + [" ".join(_WORDS)] * 5
    return train_tokenizer(texts, directory, vocab_size=vocab_size, min_frequency=2)


def make_documents(count: int, seed: int = 0, min_words: int = 1, max_words: int = 60) -> list[str]:
    """Deterministic pseudo-text documents of varied length (some shorter than a window, some longer)."""
    rng = random.Random(seed)
    docs = []
    for i in range(count):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(min_words, max_words))]
        docs.append(f"doc {i}: " + " ".join(words) + ("\n" if i % 3 == 0 else "."))
    return docs


def _jsonl_bytes(texts: Sequence[str], subsets: Sequence[str]) -> bytes:
    return b"".join(json.dumps({"text": t, "meta": {"pile_set_name": s}}).encode() + b"\n"
                    for t, s in zip(texts, subsets))


def write_jsonl_zst(path: str, texts: Sequence[str], subsets: Sequence[str], frames: int = 1) -> str:
    """A Pile-format shard; `frames > 1` writes several zstd frames back to back, as real tools may."""
    data = _jsonl_bytes(texts, subsets)
    cut = [len(data) * k // frames for k in range(frames + 1)]
    with open(path, "wb") as f:
        for a, b in zip(cut[:-1], cut[1:]):
            f.write(zstandard.ZstdCompressor(level=3).compress(data[a:b]))
    return path


def write_jsonl(path: str, texts: Sequence[str], subsets: Sequence[str]) -> str:
    with open(path, "wb") as f:
        f.write(_jsonl_bytes(texts, subsets))
    return path


def make_tiny_corpus(directory: str, num_docs: int = 40, seed: int = 0) -> tuple[list[str], list[tuple[str, str]]]:
    """A Pile-like corpus: two jsonl.zst shards (two subsets, one multi-frame) and two .txt files.

    Returns (input paths, [(text, subset)] in the order preprocessing reads them: sorted paths).
    """
    os.makedirs(directory, exist_ok=True)
    docs = make_documents(num_docs, seed)
    subsets = ["Alpha" if i % 3 else "Beta" for i in range(num_docs)]
    half = num_docs // 2
    a = write_jsonl_zst(os.path.join(directory, "00.jsonl.zst"), docs[:half], subsets[:half])
    b = write_jsonl_zst(os.path.join(directory, "01.jsonl.zst"), docs[half:], subsets[half:], frames=3)
    txt = []
    for k, text in enumerate([SAMPLE_TEXT, "short text file"]):
        path = os.path.join(directory, f"{k:02d}_plain.txt")
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        txt.append((path, text))
    order = sorted([a, b] + [p for p, _ in txt])
    by_path = {a: list(zip(docs[:half], subsets[:half])), b: list(zip(docs[half:], subsets[half:]))}
    by_path.update({p: [(t, "unspecified")] for p, t in txt})
    return order, [d for p in order for d in by_path[p]]


def example_tokens(index: int, seq_len: int, vocab_size: int) -> np.ndarray:
    """The S + 1 tokens of example `index` in `make_tiny_tfrecords`: recognisable from its content."""
    return (index * 7 + np.arange(seq_len + 1) * 3) % vocab_size


def make_tiny_tfrecords(directory: str, *, num_examples: int = 24, seq_len: int = 8, vocab_size: int = 64,
                        shard_size: int = 5, prefix: str = "train", padded_last: bool = False) -> list[dict]:
    """Write `num_examples` records in shards of `shard_size`, as preprocessing would; return their arrays.

    Example i holds `example_tokens(i)` (input_ids = tokens[:-1], labels = tokens[1:]), so a
    test can tell which examples a pipeline produced. With `padded_last`, the last example
    has three real labels and mask 0 after them.
    """
    import tensorflow as tf

    os.makedirs(directory, exist_ok=True)
    examples = []
    for i in range(num_examples):
        tokens = example_tokens(i, seq_len, vocab_size)
        mask = np.ones(seq_len, dtype=np.int64)
        if padded_last and i == num_examples - 1:
            mask[3:] = 0
        examples.append({"input_ids": tokens[:-1], "labels": tokens[1:], "input_mask": mask})
    for shard, start in enumerate(range(0, num_examples, shard_size)):
        with tf.io.TFRecordWriter(os.path.join(directory, f"{prefix}-{shard:05d}.tfrecord")) as writer:
            for ex in examples[start:start + shard_size]:
                writer.write(serialize_example(ex["input_ids"], ex["labels"], ex["input_mask"]))
    return examples


def make_tiny_preprocessed(directory: str, *, seq_len: int = 16, shard_size: int = 8,
                           val_fraction: float = 0.2) -> dict:
    """Run the real preprocessing on a tiny corpus: `<dir>/tfrecords/{train,val}` and `<dir>/tokenizer`.

    For runtime and demo tests that want data the way a user makes it. Returns the stats per split.
    """
    from input.scripts.pile.preprocess import preprocess

    tokenizer = make_tiny_tokenizer(os.path.join(directory, "tokenizer"))
    paths, _ = make_tiny_corpus(os.path.join(directory, "corpus"))
    return preprocess(paths, os.path.join(directory, "tfrecords"), tokenizer, max_sequence_length=seq_len,
                      shard_size=shard_size, val_fraction=val_fraction, workers=0, progress=False)


def write_stats_json(directory, shard_records: Sequence[int], prefix: str = "train") -> None:
    """The stats.json preprocessing leaves, for `make_tiny_tfrecords` shards as they are now."""
    shards = [{"file": f"{prefix}-{i:05d}.tfrecord", "examples": n,
               "bytes": os.path.getsize(os.path.join(directory, f"{prefix}-{i:05d}.tfrecord"))}
              for i, n in enumerate(shard_records)]
    with open(os.path.join(directory, "stats.json"), "w", encoding="utf-8") as f:
        json.dump({"split": prefix, "examples": sum(shard_records), "shards": shards}, f)


def cut_at_record_border(path, keep: int) -> None:
    """Keep the first `keep` records of a TFRecord file: a cut that no framing check can see."""
    with open(path, "rb") as f:
        data = f.read()
    end = 0
    for _ in range(keep):
        (length,) = struct.unpack("<Q", data[end:end + 8])
        end += 8 + 4 + length + 4          # length, length CRC, payload, payload CRC
    with open(path, "wb") as f:
        f.write(data[:end])
