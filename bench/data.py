"""Data pipeline throughput on the local corpus, beside raw `tokenizers` on the same text.

    python -m bench.data [--corpus DIR] [--max-mb 24] [--workers 2] [--seq-len 2048] [--rounds 3]

The peer is raw `tokenizers`: `Tokenizer.encode_batch_fast` over the corpus texts in
memory, ids taken out as Python lists, on `--workers` Rust threads (RAYON_NUM_THREADS,
unless set). Ours is the full preprocessing run (read zstd, tokenize in `--workers`
processes of one thread each, pack, serialize, write shards; timed end to end with the
worker start-up included) with the same tokenizer on the same texts. The two run
alternately `--rounds` times in one process, so load from other programs hits both
alike; each round's ratio compares the two runs of that round, and the summary gives the
min and median. CPU seconds (user + system, all threads and worker processes) per
million tokens are printed too: they move less with load than wall time. Last,
`input_fn` reads the TFRecords back (train mode: shuffle, repeat, batch, parse, checks).
Targets: preprocessing >= 100% of the peer's tokens/s, input_fn >= 2 M tokens/s on 2 cores.
"""
from __future__ import annotations

import os
import resource
import shutil
import statistics
import tempfile
import time
from typing import Callable

from config.quiet import add_verbose_flag, quiet_tensorflow
from config.cli import ArgumentParser

os.environ["TOKENIZERS_PARALLELISM"] = "true"     # the peer runs on the Rust thread pool


def _cpu_seconds() -> float:
    """User + system time of this process (all threads) and of its waited-for children."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _timed(run) -> tuple[float, float, object]:
    """(wall seconds, CPU seconds, result) of `run()`."""
    cpu, start = _cpu_seconds(), time.perf_counter()
    result = run()
    return time.perf_counter() - start, _cpu_seconds() - cpu, result


def _peer(tokenizer_json: str, texts: list[str]) -> Callable[[], int]:
    """The peer's run: raw tokenizers on the texts in memory, ids out, tokens counted with one EOS each."""
    from tokenizers import Tokenizer
    raw = Tokenizer.from_str(tokenizer_json)          # fresh per round: its word cache starts cold, as a worker's
    encode_batch = getattr(raw, "encode_batch_fast", raw.encode_batch)    # tokenizers < 0.20 has no _fast

    def run() -> int:
        return sum(len(e.ids) + 1 for e in encode_batch(texts, add_special_tokens=False))
    return run


def main() -> None:
    parser = ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--corpus", help="directory of *.jsonl.zst; default: make one from the stdlib")
    parser.add_argument("--tokenizer", help="tokenizer dir/file/hub id; default: train a byte-level BPE")
    parser.add_argument("--vocab-size", type=int, default=8192, help="size of the trained tokenizer")
    parser.add_argument("--max-mb", type=float, default=24.0, help="corpus size when making one")
    parser.add_argument("--workers", type=int, default=2,
                        help="tokenizer processes of preprocessing, and Rust threads of the peer")
    parser.add_argument("--seq-len", type=int, default=2048, help="tokens per example")
    parser.add_argument("--rounds", type=int, default=3, help="alternating runs of the peer and of preprocessing")
    parser.add_argument("--batch-size", type=int, default=8, help="input_fn batch size while timing the read-back")
    parser.add_argument("--read-seconds", type=float, default=10.0, help="how long to time input_fn")
    parser.add_argument("--keep", action="store_true", help="keep the work dir (corpus, tokenizer, shards)")
    add_verbose_flag(parser)
    args = parser.parse_args()
    if args.workers < 1 or args.rounds < 1:
        parser.error("--workers and --rounds must be at least 1")
    # Like for like: as many Rust threads for the peer as worker processes for us (set before
    # the first use of tokenizers starts its thread pool; a value the user set is kept).
    os.environ.setdefault("RAYON_NUM_THREADS", str(args.workers))
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
    tokenizer_json = tokenizer.to_json()
    print(f"corpus: {len(paths)} files, {len(texts)} documents, {text_bytes / 1e6:.1f} MB of text; "
          f"tokenizer: {tokenizer.vocab_size} tokens; cores: {os.cpu_count()}")
    print(f"peer: raw tokenizers encode_batch_fast in memory on RAYON_NUM_THREADS="
          f"{os.environ['RAYON_NUM_THREADS']} threads; ours: preprocess with {args.workers} worker processes "
          "(1 thread each) + this process reading, packing and writing")

    import tensorflow as tf  # noqa: F401  (imported before timing: a CLI run pays it once at start)

    _peer(tokenizer_json, texts[:50])()            # start the Rust thread pool before timing
    out = os.path.join(work, "tfrecords")
    peer_runs, our_runs, stats = [], [], None

    def ours() -> dict:
        shutil.rmtree(out, ignore_errors=True)
        return preprocess(paths, out, tokenizer, max_sequence_length=args.seq_len, shard_size=1000,
                          workers=args.workers, progress=False)["train"]

    print(f"{'round':<6} {'run':<26} {'seconds':>8} {'MB/s':>8} {'M tokens/s':>10} {'CPU s/M tok':>11}  ratio")
    for round_index in range(args.rounds):
        peer_run = _peer(tokenizer_json, texts)
        order = ("peer", "ours") if round_index % 2 == 0 else ("ours", "peer")   # alternate who goes first
        for who in order:
            if who == "peer":
                seconds, cpu, tokens = _timed(peer_run)
                peer_runs.append((seconds, cpu, tokens))
            else:
                seconds, cpu, stats = _timed(ours)
                our_runs.append((seconds, cpu, stats["tokens"]))
        assert stats["tokens"] == peer_runs[-1][2], (stats["tokens"], peer_runs[-1][2])
        for name, (seconds, cpu, tokens) in (("raw encode_batch_fast (peer)", peer_runs[-1]),
                                             (f"preprocess, {args.workers} workers", our_runs[-1])):
            ratio = f"{peer_runs[-1][0] / our_runs[-1][0]:.0%}" if name.startswith("pre") else ""
            print(f"{round_index:<6} {name:<26} {seconds:8.2f} {text_bytes / seconds / 1e6:8.2f} "
                  f"{tokens / seconds / 1e6:10.3f} {cpu / (tokens / 1e6):11.2f}  {ratio}")
    ratios = sorted(p[0] / o[0] for p, o in zip(peer_runs, our_runs))
    tokens = stats["tokens"]
    print(f"preprocess / peer tokens/s over {args.rounds} rounds: min {ratios[0]:.0%}, median "
          f"{statistics.median(ratios):.0%} (target >= 100%); M tokens/s median: peer "
          f"{tokens / statistics.median(r[0] for r in peer_runs) / 1e6:.3f}, preprocess "
          f"{tokens / statistics.median(r[0] for r in our_runs) / 1e6:.3f}; CPU s per M tokens median: peer "
          f"{statistics.median(r[1] for r in peer_runs) / (tokens / 1e6):.2f}, preprocess "
          f"{statistics.median(r[1] for r in our_runs) / (tokens / 1e6):.2f}")

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
    print(f"input_fn read-back (train mode, batch {args.batch_size}): {read_seconds:.2f} s, "
          f"{read_tokens / read_seconds / 1e6:.3f} M tokens/s, {read_tokens / read_seconds / 2e6:.1f}x the "
          f"2 M tokens/s target")
    print(f"stats: {stats['examples']} examples of {args.seq_len} tokens in {len(stats['shards'])} shards"
          + (f"; work dir {work}" if args.keep else ""))
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
