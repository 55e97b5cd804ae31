"""Pile-style text to GPT-J TFRecords: tokenize, join with EOS, pack into windows, shard.

    python -m input.scripts.pile.preprocess --input data/pile/train --tokenizer EleutherAI/gpt-j-6b \
        --output-dir data/tfrecords --max-sequence-length 2048 --val-fraction 0.01

Inputs are `*.jsonl.zst` (Pile shards, streamed), `*.jsonl` and `*.txt` (one document per
file), given as files, directories or globs, read in sorted order. Each kept document is
tokenized (in `--workers` processes) and followed by EOS; the stream is cut into windows of
S + 1 tokens that overlap by one token (input/packing.py), and each window becomes a record
with fixed-length int64 features:

    input_ids  = window[:-1]
    labels     = window[1:]             (input_ids shifted by one)
    input_mask[i] = 1 where labels[i] is a real token whose loss counts, 0 on padding

The last short window is padded with the EOS id (mask 0) or dropped (`--drop-last`).

Output layout: `<output-dir>/<split>/<split>-00000.tfrecord`, ... plus `stats.json`
(documents, tokens, examples, padded tokens, per-subset counts, shard sizes). With
`--val-fraction f` each document goes to `val` with probability f, decided by a seeded
hash of its text (so the split is stable and duplicates never straddle it), and the two
splits are written in two passes over the input.

An input that yields no example for a split (empty files, every document filtered out,
too few tokens for one window with `--drop-last`, no document drawn for `val`) is an error
that leaves nothing behind, unless `--allow-empty` asks for an empty split.

Re-running the same command resumes: finished shards are kept, reading restarts right after
them, and the bytes written are the same as an uninterrupted run's. Documents are not
shuffled here (the input pipeline shuffles records); `--seed` only drives the val split.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np

from input.errors import InputDataError
from input.packing import StreamPacker, Window
from input.readers import Document, ReadCounters, expand_inputs, read_documents
from input.records import encode_varints, serialize_payloads, varint_offsets
from input.shards import ProgressLog, ShardWriter, write_json_atomic
from input.tokenize_pool import TokenizePool, tokenize_to_varints
from input.tokenizer import EOS_TOKEN, GptTokenizer, load_tokenizer
from config.quiet import add_verbose_flag, quiet_tensorflow
from config.cli import ArgumentParser

__all__ = ["preprocess", "main", "in_val_split"]

FORMAT_VERSION = 1
# Text per task sent to a worker: a task costs ~0.4 ms of CPU on top of tokenizing (~85 ms
# for 256 KiB on one core), and small tasks keep the idle tail short when the last ones finish.
DEFAULT_CHUNK_BYTES = 256 << 10


def in_val_split(text: str, fraction: float, seed: int) -> bool:
    """Whether a document belongs to the val split: a seeded hash of its text, below `fraction`."""
    if fraction <= 0.0:
        return False
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8,
                             key=seed.to_bytes(8, "little", signed=True)).digest()
    return int.from_bytes(digest, "little") < fraction * 2.0 ** 64


class InputTally:
    """Running input-side counts of one split; `snapshot()` is what a progress record stores."""

    def __init__(self, snapshot: dict | None = None):
        snapshot = snapshot or {"documents": 0, "tokens": 0, "characters": 0, "repaired_documents": 0,
                                "subsets": {}}
        self.documents = snapshot["documents"]
        self.tokens = snapshot["tokens"]
        self.characters = snapshot["characters"]
        self.repaired_documents = snapshot["repaired_documents"]
        self.subsets = {k: dict(v) for k, v in snapshot["subsets"].items()}

    def add(self, subset: str, tokens: int, characters: int, repaired: bool) -> None:
        self.documents += 1
        self.tokens += tokens
        self.characters += characters
        self.repaired_documents += repaired
        entry = self.subsets.setdefault(subset, {"documents": 0, "tokens": 0})
        entry["documents"] += 1
        entry["tokens"] += tokens

    def snapshot(self) -> dict:
        return {"documents": self.documents, "tokens": self.tokens, "characters": self.characters,
                "repaired_documents": self.repaired_documents,
                "subsets": {k: dict(v) for k, v in self.subsets.items()}}


@dataclass(frozen=True)
class DocTag:
    """Where a document came from and the counts before it: what resuming at it needs."""
    file_index: int
    record_index: int
    token_offset: int    # tokens of this document already packed before the run resumed here
    before: dict         # InputTally snapshot + ReadCounters before this document


@dataclass(frozen=True)
class SplitJob:
    name: str
    directory: str
    select: Callable[[Document], bool]
    settings: dict


def _batches(documents: Iterator[Document], counters: ReadCounters, chunk_bytes: int
             ) -> Iterator[tuple[list, list[str]]]:
    """Group documents into (metadata, texts) tasks of about `chunk_bytes` of text.

    The reader's counters are snapshotted as each document arrives: the reader runs ahead
    of the packing, and a resume at this document must not count later records twice.
    """
    metas, texts, size = [], [], 0
    for doc in documents:
        metas.append((doc, counters.to_dict()))
        texts.append(doc.text)
        size += len(doc.text)
        if size >= chunk_bytes:
            yield metas, texts
            metas, texts, size = [], [], 0
    if texts:
        yield metas, texts


def _progress_bar(total: int, initial: int, desc: str, enabled: bool):
    from tqdm import tqdm
    return tqdm(total=total, initial=initial, desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
                smoothing=0.05, disable=not enabled, dynamic_ncols=True)


class _SplitOutput:
    """The writing side of one split: shards, progress records and the output counts."""

    def __init__(self, job: SplitJob, log: ProgressLog, seq_len: int, shard_size: int, done: list[dict],
                 state: dict | None):
        self.log = log
        self.writer = ShardWriter(job.directory, job.name, shard_size, first_index=len(done))
        self.seq_len = seq_len
        self.shards = [{k: r[k] for k in ("file", "examples", "bytes")} for r in done]
        self.examples = state["examples"] if state else 0
        self.padded = state["padded_tokens"] if state else 0
        self.dropped = state["dropped_labels"] if state else 0
        self._full_mask = b"\x01" * seq_len

    def state(self, before: dict) -> dict:
        """A progress record's state: input counts `before` the resume point plus the output counts."""
        return {**before, "examples": self.examples, "padded_tokens": self.padded, "dropped_labels": self.dropped}

    def write(self, window: Window, now: Callable[[], dict]) -> None:
        """Write one window; when that completes a shard, record where the next window starts.

        `now()` gives the input counts at the end of the input (for the last window only).
        """
        if window.num_real == self.seq_len:
            mask = self._full_mask
        else:
            mask = encode_varints(np.arange(self.seq_len) < window.num_real)[0].tobytes()
        info = self.writer.write(serialize_payloads(window.payloads[0], mask, window.payloads[1]))
        self.examples += 1
        if info is None:
            return
        self.shards.append(info.to_dict())
        if window.next_start is None:
            self.log.record(info, None, self.state(now()))
            return
        tag, offset = window.next_start
        next_start = {"file_index": tag.file_index, "record_index": tag.record_index,
                      "token_offset": tag.token_offset + offset}
        self.log.record(info, next_start, self.state(tag.before))

    def finish(self, final: Window | None, drop_last: bool, now: Callable[[], dict]) -> None:
        """Pad and write (or drop) the last short window and close the open shard."""
        if final is not None:
            if drop_last:
                self.dropped = final.num_real
            else:
                self.padded = self.seq_len - final.num_real
                self.write(final, now)
        info = self.writer.close()
        if info is not None:
            self.shards.append(info.to_dict())
            self.log.record(info, None, self.state(now()))


def _first_missing(directory: str) -> str | None:
    """The outermost of `directory` and its parents that does not exist yet (what makedirs would create)."""
    path, missing = os.path.abspath(directory), None
    while not os.path.exists(path):
        path, missing = os.path.dirname(path), path
    return missing


def _describe_inputs(paths: list[str]) -> str:
    return paths[0] if len(paths) == 1 else f"{len(paths)} input files ({paths[0]}, ...)"


def _why_no_example(job: SplitJob, tally: InputTally, counters: ReadCounters, other_split: int,
                    dropped: int, seq_len: int) -> str:
    """Why a split got no example, and the fix, for the error message."""
    if tally.documents:
        return (f"its {tally.tokens} tokens fill no whole window of {seq_len + 1} and --drop-last dropped "
                "them; omit --drop-last or lower --max-sequence-length")
    if other_split:
        return (f"all {other_split} documents went to the other split (--val-fraction "
                f"{job.settings['val_fraction']}); change --val-fraction or add documents")
    if counters.filtered_out:
        return (f"all {counters.filtered_out} documents have a meta.pile_set_name other than "
                f"{', '.join(job.settings['pile_set_names'])}; check the --pile-set-name values")
    skipped = f", {counters.bad_lines} bad lines and {len(counters.bad_files)} bad files skipped" \
        if counters.bad_lines or counters.bad_files else ""
    return (f"it holds no non-empty document ({counters.empty_documents} empty documents{skipped}); "
            "check that --input names the right files")


def _run_split(job: SplitJob, paths: list[str], tokenizer: GptTokenizer, *, seq_len: int, shard_size: int,
               drop_last: bool, subsets: Sequence[str] | None, skip_bad_files: bool, workers: int,
               overwrite: bool, progress: bool, chunk_bytes: int, allow_empty: bool) -> dict:
    created = _first_missing(job.directory)
    os.makedirs(job.directory, exist_ok=True)
    log = ProgressLog(job.directory)
    created = created or (None if os.path.isdir(log.folder) else log.folder)
    log.check_settings(job.settings, overwrite)
    stats_path = os.path.join(job.directory, "stats.json")
    done, last = log.resume_point(job.name)
    if last is not None and last["next"] is None and os.path.isfile(stats_path):
        with open(stats_path, encoding="utf-8") as f:
            return json.load(f)                      # finished earlier: nothing to redo
    state = last["state"] if last else None
    if last is None:
        cursor, token_offset = (0, 0), 0
    elif last["next"] is None:                       # all shards written, stats.json was not
        cursor, token_offset = (len(paths), 0), 0
    else:
        cursor = (last["next"]["file_index"], last["next"]["record_index"])
        token_offset = last["next"]["token_offset"]
    tally = InputTally(state["input"] if state else None)
    counters = ReadCounters.from_dict(state["reader"]) if state else ReadCounters()
    output = _SplitOutput(job, log, seq_len, shard_size, done, state)
    packer = StreamPacker(seq_len, pad_id=tokenizer.eos_id)

    def now() -> dict:
        return {"input": tally.snapshot(), "reader": counters.to_dict()}

    sizes = [os.path.getsize(p) for p in paths]
    bar = _progress_bar(sum(sizes), sum(sizes[:cursor[0]]), job.name, progress)
    started, tokens_before = time.perf_counter(), tally.tokens
    other_split = 0

    def selected(document: Document) -> bool:
        nonlocal other_split
        keep = job.select(document)
        other_split += not keep
        return keep

    documents = filter(selected, read_documents(paths, start=cursor, subsets=subsets, skip_bad=skip_bad_files,
                                                counters=counters))
    try:
        with TokenizePool(tokenizer, workers, task=tokenize_to_varints) as pool:
            for metas, tokens, lengths, varints in pool.map(_batches(documents, counters, chunk_bytes)):
                offsets = varint_offsets(varints)                       # [tokens + 1]
                skip, first = 0, metas[0][0]
                if token_offset and (first.file_index, first.record_index) == cursor:
                    skip, token_offset = token_offset, 0   # resuming inside it: earlier shards hold `skip` tokens
                tags = []
                for index, ((doc, reader_before), length) in enumerate(zip(metas, lengths.tolist())):
                    tags.append(DocTag(doc.file_index, doc.record_index, skip if index == 0 else 0,
                                       {"input": tally.snapshot(), "reader": reader_before}))
                    tally.add(doc.subset, length, len(doc.text), doc.repaired)
                if skip:
                    tokens, offsets, lengths = tokens[skip:], offsets[skip:], np.r_[lengths[0] - skip, lengths[1:]]
                for window in packer.add_documents(tokens, lengths, tags, (varints, offsets)):
                    output.write(window, now)
                bar.update(metas[-1][0].raw_bytes_done - bar.n)
                rate = (tally.tokens - tokens_before) / max(time.perf_counter() - started, 1e-9)
                bar.set_postfix(tokens=f"{rate / 1e3:.0f}k/s", refresh=False)
            output.finish(packer.finish(), drop_last, now)
        bar.update(bar.total - bar.n)
    except BaseException:
        output.writer.abort()
        raise
    finally:
        bar.close()

    if output.examples == 0 and not allow_empty:
        if created is not None:            # nothing but this run's settings record is in there
            shutil.rmtree(created)
        raise InputDataError(f"{_describe_inputs(paths)}: no example for split {job.name}: "
                             f"{_why_no_example(job, tally, counters, other_split, output.dropped, seq_len)}"
                             ", or pass --allow-empty to write an empty split")
    stats = {"split": job.name, **tally.snapshot(), **counters.to_dict(), "examples": output.examples,
             "padded_tokens": output.padded, "dropped_labels": output.dropped, "shards": output.shards,
             "settings": job.settings}
    write_json_atomic(stats_path, stats)
    return stats


def preprocess(inputs: Sequence[str], output_dir: str, tokenizer: GptTokenizer | str, *,
               max_sequence_length: int = 2048, shard_size: int = 10000, split: str = "train",
               val_fraction: float = 0.0, seed: int = 0, pile_set_names: Sequence[str] | None = None,
               drop_last: bool = False, skip_bad_files: bool = False, workers: int | None = None,
               overwrite: bool = False, progress: bool = True, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
               allow_empty: bool = False) -> dict[str, dict]:
    """Write `<output_dir>/<split>/` (and `<output_dir>/val/` when val_fraction > 0); return stats per split.

    A split that gets no example raises InputDataError (removing what this call created for
    it) unless `allow_empty`."""
    if max_sequence_length < 1 or shard_size < 1:
        raise ValueError("max_sequence_length and shard_size must be positive")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction={val_fraction} must be in [0, 1)")
    if val_fraction > 0 and split == "val":
        raise ValueError("--split val with --val-fraction would write both splits to one place; "
                         "use another --split name")
    if not isinstance(tokenizer, GptTokenizer):
        tokenizer = load_tokenizer(tokenizer)
    workers = (os.cpu_count() or 1) if workers is None else workers
    paths = expand_inputs(inputs)
    common = {
        "format": FORMAT_VERSION, "inputs": [[p, os.path.getsize(p)] for p in paths],
        "tokenizer": tokenizer.fingerprint, "eos_id": tokenizer.eos_id,
        "max_sequence_length": max_sequence_length, "shard_size": shard_size, "drop_last": drop_last,
        "pile_set_names": sorted(pile_set_names) if pile_set_names else None,
        "val_fraction": val_fraction, "seed": seed, "skip_bad_files": skip_bad_files,
    }
    jobs = [SplitJob(split, os.path.join(output_dir, split),
                     lambda d: not in_val_split(d.text, val_fraction, seed), {**common, "split": split})]
    if val_fraction > 0:
        jobs.append(SplitJob("val", os.path.join(output_dir, "val"),
                             lambda d: in_val_split(d.text, val_fraction, seed), {**common, "split": "val"}))
    return {job.name: _run_split(job, paths, tokenizer, seq_len=max_sequence_length, shard_size=shard_size,
                                 drop_last=drop_last, subsets=pile_set_names, skip_bad_files=skip_bad_files,
                                 workers=workers, overwrite=overwrite, progress=progress,
                                 chunk_bytes=chunk_bytes, allow_empty=allow_empty)
            for job in jobs}


def _parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="python -m input.scripts.pile.preprocess",
        description="Tokenize Pile-style text (jsonl.zst, jsonl, txt) into packed GPT-J TFRecords.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--input", nargs="+", required=True,
                        help="input files, directories (searched recursively) or globs")
    parser.add_argument("--output-dir", required=True, help="shards go to <output-dir>/<split>/")
    parser.add_argument("--tokenizer", required=True,
                        help="directory with tokenizer.json or vocab.json+merges.txt, a tokenizer.json, "
                             "or a hub id such as EleutherAI/gpt-j-6b")
    parser.add_argument("--eos-token", default=EOS_TOKEN, help="token that ends every document")
    parser.add_argument("--max-sequence-length", type=int, default=2048, help="tokens per example (S)")
    parser.add_argument("--shard-size", type=int, default=10000, help="examples per shard file")
    parser.add_argument("--split", default="train", help="name of the split (folder and shard prefix)")
    parser.add_argument("--val-fraction", type=float, default=0.0,
                        help="fraction of documents written to <output-dir>/val instead")
    parser.add_argument("--seed", type=int, default=0, help="seed of the val split's hash")
    parser.add_argument("--pile-set-name", action="append", default=None, metavar="NAME",
                        help="keep only documents whose meta.pile_set_name is NAME (repeatable)")
    parser.add_argument("--drop-last", action="store_true",
                        help="drop the final short window instead of padding it with EOS (mask 0)")
    parser.add_argument("--skip-bad-files", action="store_true",
                        help="skip unreadable files/lines (counted in stats.json) instead of stopping")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="tokenizer processes (0: tokenize in this process)")
    parser.add_argument("--overwrite", action="store_true", help="discard shards of an earlier run")
    parser.add_argument("--allow-empty", action="store_true",
                        help="write a split that gets no example (0 examples in stats.json) instead of failing")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_verbose_flag(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    quiet_tensorflow(args.verbose)
    try:
        tokenizer = load_tokenizer(args.tokenizer, eos_token=args.eos_token)
        results = preprocess(args.input, args.output_dir, tokenizer,
                             max_sequence_length=args.max_sequence_length, shard_size=args.shard_size,
                             split=args.split, val_fraction=args.val_fraction, seed=args.seed,
                             pile_set_names=args.pile_set_name, drop_last=args.drop_last,
                             skip_bad_files=args.skip_bad_files, workers=args.workers,
                             overwrite=args.overwrite, progress=not args.no_progress,
                             allow_empty=args.allow_empty)
    except (InputDataError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for name, stats in results.items():
        skipped = len(stats["bad_files"])
        print(f"{name}: {stats['documents']} documents, {stats['tokens']} tokens, {stats['examples']} "
              f"examples in {len(stats['shards'])} shards, {stats['padded_tokens']} padded tokens"
              + (f", {skipped} bad files and {stats['bad_lines']} bad lines skipped" if skipped or
                 stats["bad_lines"] else "")
              + f"; written to {os.path.join(args.output_dir, name)} (stats.json beside the shards)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
