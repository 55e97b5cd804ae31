"""A Pile-format corpus from text already on any machine with Python, for offline demos.

    python -m input.scripts.make_local_corpus --output-dir demo_work/corpus --max-mb 8

Gathers the standard library's `.py` sources (pile_set_name "PythonStdlib") and its text
documents `.txt`/`.rst`/`.md` ("PythonStdlibDocs"), skipping site-packages and files that
are not UTF-8, and writes them as `local-00000.jsonl.zst` shards of Pile records
{"text": ..., "meta": {"pile_set_name": ..., "path": ...}}. The demo then runs exactly the
preprocessing a Pile user runs. Output is deterministic for the same machine, `--seed`
and `--max-mb`: files are taken in a seeded shuffle of their sorted paths until the
limit (uncompressed text) is reached.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import sysconfig
from typing import Iterator, Sequence

import zstandard

from config.quiet import add_verbose_flag, quiet_tensorflow
from config.cli import ArgumentParser

__all__ = ["make_local_corpus", "default_sources", "main"]

_SUBSETS = {".py": "PythonStdlib", ".txt": "PythonStdlibDocs", ".rst": "PythonStdlibDocs",
            ".md": "PythonStdlibDocs"}
_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}
_MB = 1_000_000


def default_sources() -> list[str]:
    return [sysconfig.get_paths()["stdlib"]]


def _candidate_files(sources: Sequence[str]) -> list[tuple[str, str]]:
    """(path, path relative to its source) of every text file under `sources`, sorted."""
    found = []
    for source in sources:
        for root, dirs, names in os.walk(source):
            dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS)
            for name in names:
                if os.path.splitext(name)[1] in _SUBSETS:
                    path = os.path.join(root, name)
                    found.append((path, os.path.relpath(path, source)))
    return sorted(found, key=lambda item: item[1])


def _documents(files: list[tuple[str, str]], limit_bytes: int) -> Iterator[tuple[bytes, int]]:
    """(JSON line, text bytes) for files in order until the text reaches `limit_bytes`."""
    total = 0
    for path, relative in files:
        try:
            with open(path, "rb") as f:
                raw = f.read()
            text = raw.decode("utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        if not text.strip():
            continue
        if total + len(raw) > limit_bytes:
            if total:
                return
            raw, text = raw[:limit_bytes], raw[:limit_bytes].decode("utf-8", "ignore")
        total += len(raw)
        subset = _SUBSETS[os.path.splitext(path)[1]]
        record = {"text": text, "meta": {"pile_set_name": subset, "path": relative.replace(os.sep, "/")}}
        yield json.dumps(record, ensure_ascii=False).encode("utf-8") + b"\n", len(raw)


def make_local_corpus(output_dir: str, *, sources: Sequence[str] | None = None, max_mb: float = 16.0,
                      shard_mb: float = 8.0, seed: int = 0) -> dict:
    """Write `local-NNNNN.jsonl.zst` shards into `output_dir`; return {"files", "documents", "text_bytes"}."""
    if max_mb <= 0 or shard_mb <= 0:
        raise ValueError("--max-mb and --shard-mb must be positive")
    sources = list(sources) if sources else default_sources()
    for source in sources:
        if not os.path.isdir(source):
            raise FileNotFoundError(f"source directory {source} does not exist; pass --source with a directory "
                                    "of .py/.txt/.rst/.md files")
    files = _candidate_files(sources)
    random.Random(seed).shuffle(files)
    os.makedirs(output_dir, exist_ok=True)
    for stale in os.listdir(output_dir):
        if stale.startswith("local-") and stale.endswith(".jsonl.zst"):
            os.unlink(os.path.join(output_dir, stale))
    written, documents, text_bytes = [], 0, 0
    shard: list[bytes] = []
    shard_bytes = 0

    def flush() -> None:
        path = os.path.join(output_dir, f"local-{len(written):05d}.jsonl.zst")
        with open(path + ".tmp", "wb") as f:
            f.write(zstandard.ZstdCompressor(level=3).compress(b"".join(shard)))
        os.replace(path + ".tmp", path)
        written.append(path)

    for line, size in _documents(files, int(max_mb * _MB)):
        shard.append(line)
        shard_bytes += size
        documents += 1
        text_bytes += size
        if shard_bytes >= shard_mb * _MB:
            flush()
            shard, shard_bytes = [], 0
    if shard:
        flush()
    if not written:
        raise FileNotFoundError(f"no UTF-8 .py/.txt/.rst/.md files under {', '.join(sources)}")
    return {"files": written, "documents": documents, "text_bytes": text_bytes}


def main(argv: Sequence[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m input.scripts.make_local_corpus",
                                     description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--output-dir", required=True, help="directory for the .jsonl.zst shards")
    parser.add_argument("--source", action="append", default=None,
                        help="directory to gather text from (repeatable); default: the Python stdlib")
    parser.add_argument("--max-mb", type=float, default=16.0, help="stop after this much text (10^6 bytes)")
    parser.add_argument("--shard-mb", type=float, default=8.0, help="text per .jsonl.zst shard")
    parser.add_argument("--seed", type=int, default=0, help="seed of the file order")
    add_verbose_flag(parser)
    args = parser.parse_args(argv)
    quiet_tensorflow(args.verbose)
    try:
        summary = make_local_corpus(args.output_dir, sources=args.source, max_mb=args.max_mb,
                                    shard_mb=args.shard_mb, seed=args.seed)
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {len(summary['files'])} shards, {summary['documents']} documents, "
          f"{summary['text_bytes'] / _MB:.1f} MB of text to {args.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
