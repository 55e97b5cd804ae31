"""Fetch Pile-style shards (`*.jsonl.zst`) from a hub dataset repo, or gather them from a local copy.

    python -m input.scripts.pile.download --source monology/pile-uncopyrighted \
        --pattern "train/00.jsonl.zst" --pattern "val.jsonl.zst" --output-dir data/pile
    python -m input.scripts.pile.download --source /mnt/datasets/pile --pattern "train/0*.jsonl.zst" \
        --output-dir data/pile --symlink

A `--source` that exists on disk is used as is (matching files are copied or symlinked,
keeping their relative paths) and never touches the network; anything else is taken as a
hub dataset id and fetched with `huggingface_hub.snapshot_download(allow_patterns=...)`,
which resumes interrupted downloads and skips files already present. Either way the
result is a directory `preprocess.py --input` can read.
"""
from __future__ import annotations

import argparse
import fnmatch
import os
import shutil
import sys
from typing import Sequence

from input.errors import InputDataError
from config.quiet import add_verbose_flag, quiet_tensorflow
from config.cli import ArgumentParser

__all__ = ["download_pile", "main"]

DEFAULT_PATTERNS = ("*.jsonl.zst",)


def _matching(root: str, patterns: Sequence[str]) -> list[str]:
    """Paths under `root`, relative and '/'-separated, that match any pattern; sorted."""
    found = []
    for directory, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in names:
            relative = os.path.relpath(os.path.join(directory, name), root).replace(os.sep, "/")
            if any(fnmatch.fnmatch(relative, p) for p in patterns):
                found.append(relative)
    return sorted(found)


def _from_local(source: str, output_dir: str, patterns: Sequence[str], symlink: bool) -> list[str]:
    relatives = _matching(source, patterns)
    if not relatives:
        raise InputDataError(f"no file under {source} matches {', '.join(patterns)}; check --pattern")
    if os.path.abspath(source) == os.path.abspath(output_dir):
        return [os.path.join(output_dir, r) for r in relatives]
    written = []
    for relative in relatives:
        src, dst = os.path.join(source, relative), os.path.join(output_dir, relative)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        if os.path.lexists(dst) and os.path.getsize(dst) == os.path.getsize(src):
            written.append(dst)          # already there from an earlier run
            continue
        if symlink:
            if os.path.lexists(dst):
                os.unlink(dst)
            os.symlink(os.path.abspath(src), dst)
        else:
            shutil.copyfile(src, dst + ".tmp")
            os.replace(dst + ".tmp", dst)
        written.append(dst)
    return written


def _from_hub(repo_id: str, output_dir: str, patterns: Sequence[str], revision: str | None) -> list[str]:
    from huggingface_hub import snapshot_download

    try:
        snapshot_download(repo_id, repo_type="dataset", revision=revision, allow_patterns=list(patterns),
                          local_dir=output_dir)
    except Exception as err:
        raise InputDataError(
            f"cannot fetch {', '.join(patterns)} from hub dataset {repo_id!r} ({type(err).__name__}: {err}); "
            "check the id, the patterns and the network (a gated dataset needs `hf auth login`), or pass a "
            "local directory as --source") from None
    files = [os.path.join(output_dir, r) for r in _matching(output_dir, patterns)]
    if not files:
        raise InputDataError(f"hub dataset {repo_id!r} has no file matching {', '.join(patterns)}; "
                             "list its files on the hub and fix --pattern")
    return files


def download_pile(source: str, output_dir: str, *, patterns: Sequence[str] = DEFAULT_PATTERNS,
                  revision: str | None = None, symlink: bool = False) -> list[str]:
    """Local paths of the shards matching `patterns`, gathered into `output_dir`."""
    os.makedirs(output_dir, exist_ok=True)
    if os.path.isdir(source):
        return _from_local(source, output_dir, patterns, symlink)
    if source.startswith((".", "/", "~")) or source.count("/") != 1:
        raise InputDataError(f"--source {source!r} is neither an existing directory nor a hub dataset id "
                             "like 'owner/name'; fix the path")
    return _from_hub(source, output_dir, patterns, revision)


def main(argv: Sequence[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m input.scripts.pile.download",
                                     description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--source", required=True, help="hub dataset id (owner/name) or a local directory")
    parser.add_argument("--output-dir", required=True, help="directory the shards are gathered into")
    parser.add_argument("--pattern", action="append", default=None,
                        help=f"glob of files to fetch, relative to the repo root (repeatable); default "
                             f"{DEFAULT_PATTERNS[0]}")
    parser.add_argument("--revision", default=None, help="hub branch, tag or commit")
    parser.add_argument("--symlink", action="store_true", help="local source: link instead of copying")
    add_verbose_flag(parser)
    args = parser.parse_args(argv)
    quiet_tensorflow(args.verbose)
    try:
        files = download_pile(args.source, args.output_dir, patterns=args.pattern or DEFAULT_PATTERNS,
                              revision=args.revision, symlink=args.symlink)
    except InputDataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"{len(files)} files in {args.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
