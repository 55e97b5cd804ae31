"""Data pipeline throughput on the local corpus, beside raw `tokenizers` on the same text.

    python -m bench.data [--corpus DIR] [--max-mb 24] [--workers 2] [--seq-len 2048]

Prints three rows: raw `Tokenizer.encode_batch_fast` over the corpus texts in memory (the
peer: all cores through the Rust thread pool), the full preprocessing run (read zstd,
tokenize in `--workers` processes, pack, serialize, write shards; timed end to end with
the worker start-up included), and `input_fn` reading the TFRecords back (train mode:
shuffle, repeat, batch, parse, checks). Targets: preprocessing >= 80% of raw tokens/s,
input_fn >= 2 M tokens/s on 2 cores.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time

from config.quiet import add_verbose_flag, quiet_tensorflow
from config.cli import ArgumentParser

os.environ["TOKENIZERS_PARALLELISM"] = "true"     # the raw peer may use every core


def _row(name: str, seconds: float, text_bytes: float | None, tokens: float, note: str = "") -> None:
    mb_s = f"{text_bytes / seconds / 1e6:8.2f}" if text_bytes is not None else " " * 8
    print(f"{name:<34} {seconds:8.2f} {mb_s} {tokens / seconds / 1e6:10.3f}  {note}")


def main() -> None:
    parser = ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--corpus", help="directory of *.jsonl.zst; default: make one from the stdlib")
    parser.add_argument("--tokenizer", help="tokenizer dir/file/hub id; default: train a byte-level BPE")
    parser.add_argument("--vocab-size", type=int, default=8192, help="size of the trained tokenizer")
    parser.add_argument("--max-mb", type=float, default=24.0, help="corpus size when making one")
    parser.add_argument("--workers", type=int, default=2, help="tokenizer processes of preprocessing")
    parser.add_argument("--seq-len", type=int, default=2048, help="tokens per example")
    parser.add_argument("--batch-size", type=int, default=8, help="input_fn batch size while timing the read-back")
    parser.add_argument("--read-seconds", type=float, default=10.0, help="how long to time input_fn")
    parser.add_argument("--keep", action="store_true", help="keep the work dir (corpus, tokenizer, shards)")
    add_verbose_flag(parser)
    args = parser.parse_args()
    quiet_tensorflow(args.verbose)
    from bench.machine import describe_machine
    print(describe_machine())

    from input.readers import expand_inputs, read_documents
    from input.scripts.make_local_corpus import make_local_corpus
    from input.scripts.pile.preprocess import preprocess
    from input.scripts.train_tokenizer import train_tokenizer
    from input.tokenizer import load_tokenizer

    work = tempfile.mkdtemp(prefix="bench_data_")
    corpus = args.corpus or os.path.join(work, "corpus")
    if not args.corpus:
        make_local_corpus(corpus, max_mb=args.max_mb)
    paths = expand_inputs([corpus])
    texts = [d.text for d in read_documents(paths)]
    text_bytes = sum(len(t.encode("utf-8")) for t in texts)
    if args.tokenizer:
        tokenizer = load_tokenizer(args.tokenizer)
    else:
        sample, size = [], 0
        for text in texts:                   # train on the first ~4 MB: enough for the merges we keep
            sample.append(text)
            size += len(text)
            if size > 4e6:
                break
        tokenizer = train_tokenizer(sample, os.path.join(work, "tokenizer"), vocab_size=args.vocab_size)
    print(f"corpus: {len(paths)} files, {len(texts)} documents, {text_bytes / 1e6:.1f} MB of text; "
          f"tokenizer: {tokenizer.vocab_size} tokens; cores: {os.cpu_count()}")
    print(f"{'':<34} {'seconds':>8} {'MB/s':>8} {'M tokens/s':>10}")

    tokenizer.encode_batch(texts[:50])       # warm the thread pool
    start = time.perf_counter()
    raw_tokens = sum(len(ids) + 1 for ids in tokenizer.encode_batch(texts))
    raw_seconds = time.perf_counter() - start
    _row("raw tokenizers encode_batch_fast", raw_seconds, text_bytes, raw_tokens, "(peer, in memory)")

    import tensorflow as tf  # noqa: F401  (imported before timing: a CLI run pays it once at start)

    out = os.path.join(work, "tfrecords")
    start = time.perf_counter()
    stats = preprocess(paths, out, tokenizer, max_sequence_length=args.seq_len, shard_size=1000,
                       workers=args.workers, progress=False)["train"]
    pre_seconds = time.perf_counter() - start
    assert stats["tokens"] == raw_tokens, (stats["tokens"], raw_tokens)
    pre_rate, raw_rate = stats["tokens"] / pre_seconds, raw_tokens / raw_seconds
    _row(f"preprocess, {args.workers} workers", pre_seconds, text_bytes, stats["tokens"],
         f"{pre_rate / raw_rate:.0%} of raw (target >= 80%)")

    from data import input_fn
    from config import modes
    from config.params import parse_params

    params = parse_params({
        "model": {"vocab_size": max(tokenizer.vocab_size, 64), "hidden_size": 64, "num_heads": 4,
                  "rotary_dim": 8, "max_position_embeddings": args.seq_len},
        "train_input": {"data_dir": os.path.join(out, "train"), "batch_size": args.batch_size,
                        "max_sequence_length": args.seq_len, "shuffle_buffer": 1000},
    })
    dataset = input_fn(params, modes.TRAIN)
    iterator = iter(dataset)
    for _ in range(5):                      # fill buffers before timing
        next(iterator)
    batches, start = 0, time.perf_counter()
    while time.perf_counter() - start < args.read_seconds:
        features, labels = next(iterator)
        batches += 1
    read_seconds = time.perf_counter() - start
    read_tokens = batches * args.batch_size * args.seq_len
    _row("input_fn read-back (train mode)", read_seconds, None, read_tokens,
         f"{read_tokens / read_seconds / 2e6:.1f}x the 2 M tokens/s target")
    print(f"stats: {stats['examples']} examples of {args.seq_len} tokens in {len(stats['shards'])} shards"
          + (f"; work dir {work}" if args.keep else ""))
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
