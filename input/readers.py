"""Raw text in: Pile `*.jsonl.zst`, `*.jsonl` and plain `*.txt`, as a stream of documents.

A Pile line is a JSON object {"text": ..., "meta": {"pile_set_name": ...}}; a `.txt` file
is one document. The stream is deterministic (inputs sorted, files read in order) and
restartable at a `(file_index, record_index)` cursor, which is how preprocessing resumes.
Bad input raises `InputDataError` naming the file (and line); with `skip_bad=True` a bad
line is skipped and a broken file is abandoned where it breaks, both counted in
`ReadCounters` so the caller can report them.
"""
from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import zstandard

from input.errors import InputDataError

__all__ = ["INPUT_SUFFIXES", "UNSPECIFIED_SUBSET", "Document", "ReadCounters", "expand_inputs",
           "read_documents", "read_file_records", "repair_unicode"]

INPUT_SUFFIXES = (".jsonl.zst", ".jsonl", ".txt")
UNSPECIFIED_SUBSET = "unspecified"     # subset name of .txt files and lines without meta
_READ_CHUNK = 1 << 20                   # compressed bytes per read


@dataclass(frozen=True)
class Document:
    text: str
    subset: str
    file_index: int        # position of its file in the expanded input list
    record_index: int      # line (jsonl) or 0 (txt) in that file: the resume cursor
    raw_bytes_done: int    # on-disk bytes of all inputs consumed so far (for the progress bar)
    repaired: bool = False  # lone UTF-16 surrogates (from JSON escapes) were replaced by U+FFFD


@dataclass
class ReadCounters:
    """What the reader dropped, filled as it goes. Only records that yield no document change it,
    so a snapshot taken when a document is yielded is exact for resuming at that document."""
    filtered_out: int = 0         # documents of another pile_set_name
    empty_documents: int = 0
    bad_lines: int = 0
    bad_files: list = field(default_factory=list)   # [{"file", "error"}]

    def to_dict(self) -> dict:
        return {"filtered_out": self.filtered_out, "empty_documents": self.empty_documents,
                "bad_lines": self.bad_lines, "bad_files": list(self.bad_files)}

    @classmethod
    def from_dict(cls, data: dict) -> "ReadCounters":
        return cls(data["filtered_out"], data["empty_documents"], data["bad_lines"], list(data["bad_files"]))


def _has_input_suffix(path: str) -> bool:
    return path.endswith(INPUT_SUFFIXES)


def expand_inputs(specs: Sequence[str]) -> list[str]:
    """Files named by `specs` (files, directories searched recursively, or globs), in a stable order."""
    found: list[str] = []
    for spec in specs:
        if os.path.isfile(spec):
            if not _has_input_suffix(spec):
                raise InputDataError(f"input {spec} is not a {', '.join(INPUT_SUFFIXES)} file; "
                                     "rename it or convert it to one of those formats")
            matches = [spec]
        elif os.path.isdir(spec):
            matches = sorted(os.path.join(root, name) for root, _, names in os.walk(spec)
                             for name in names if _has_input_suffix(name))
            if not matches:
                raise InputDataError(f"input directory {spec} holds no {', '.join(INPUT_SUFFIXES)} files")
        else:
            matches = sorted(p for p in glob.glob(spec, recursive=True)
                             if os.path.isfile(p) and _has_input_suffix(p))
            if not matches:
                raise InputDataError(f"input {spec} matches no {', '.join(INPUT_SUFFIXES)} file; "
                                     "check the path or glob")
        found.extend(os.path.abspath(m) for m in matches)
    unique = list(dict.fromkeys(found))
    if not unique:
        raise InputDataError("no input files given; pass files, directories or globs")
    return unique


def _zst_lines(handle) -> Iterator[tuple[bytes, int]]:
    """(line, compressed bytes read) of a multi-frame zstd stream; ZstdError or EOFError when broken."""
    decompressor = zstandard.ZstdDecompressor()
    frame = decompressor.decompressobj()
    in_frame = False
    pending = b""
    while True:
        raw = handle.read(_READ_CHUNK)
        if not raw:
            break
        pieces = []
        while raw:
            pieces.append(frame.decompress(raw))
            in_frame = True
            if frame.eof:          # a frame ended inside this read: start the next one on the rest
                raw = frame.unused_data
                frame = decompressor.decompressobj()
                in_frame = False
            else:
                raw = b""
        lines = (pending + b"".join(pieces)).split(b"\n")
        pending = lines.pop()
        position = handle.tell()
        for line in lines:
            yield line, position
    if in_frame:
        raise EOFError("the zstd stream ends in the middle of a frame (file truncated?)")
    if pending:
        yield pending, handle.tell()


def repair_unicode(text: str) -> str:
    """`text` with lone surrogates (which JSON can escape but UTF-8 cannot hold) replaced by U+FFFD."""
    if text.isascii():
        return text
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def _plain_lines(handle) -> Iterator[tuple[bytes, int]]:
    position = 0
    for line in handle:
        position += len(line)
        yield line.rstrip(b"\n"), position


def read_file_records(path: str, *, start_record: int = 0, skip_bad: bool = False,
                      counters: ReadCounters | None = None) -> Iterator[tuple[int, str | None, str, int]]:
    """(record_index, text or None for a dropped record, subset, bytes read) per record of one file.

    Records before `start_record` are skipped without parsing. A dropped record (blank or bad
    line) still yields its index so cursors stay exact.
    """
    counters = counters if counters is not None else ReadCounters()
    fix = "repair or remove the file, or pass --skip-bad-files to skip what cannot be read"
    if path.endswith(".txt"):
        if start_record > 0:
            return
        try:
            with open(path, "rb") as f:
                raw = f.read()
            text = raw.decode("utf-8")
        except (OSError, UnicodeDecodeError) as err:
            if not skip_bad:
                raise InputDataError(f"{path}: cannot read it as UTF-8 text ({err}); {fix}") from None
            counters.bad_files.append({"file": path, "error": str(err)})
            return
        yield 0, text, UNSPECIFIED_SUBSET, len(raw)
        return
    line_source = _zst_lines if path.endswith(".zst") else _plain_lines
    index = -1
    try:
        with open(path, "rb") as f:
            for index, (line, position) in enumerate(line_source(f)):
                if index < start_record:
                    continue
                if not line.strip():
                    yield index, None, UNSPECIFIED_SUBSET, position
                    continue
                try:
                    record = json.loads(line)
                    text = record["text"]
                    if not isinstance(text, str):
                        raise TypeError(f'"text" is a {type(text).__name__}, not a string')
                    meta = record.get("meta") or {}
                    subset = meta.get("pile_set_name") if isinstance(meta, dict) else None
                except (ValueError, KeyError, TypeError, AttributeError) as err:
                    reason = f"missing key {err}" if isinstance(err, KeyError) else str(err)
                    if not skip_bad:
                        raise InputDataError(f"{path} line {index + 1}: not a Pile record "
                                             f'{{"text": ..., "meta": {{...}}}} ({reason}); {fix}') from None
                    counters.bad_lines += 1
                    yield index, None, UNSPECIFIED_SUBSET, position
                    continue
                yield index, text, str(subset) if subset is not None else UNSPECIFIED_SUBSET, position
    except (zstandard.ZstdError, EOFError, OSError) as err:
        where = f"after line {index + 1}" if index >= 0 else "at the start"
        if not skip_bad:
            raise InputDataError(f"{path}: unreadable {where} ({err}); {fix}") from None
        counters.bad_files.append({"file": path, "error": f"{where}: {err}"})


def read_documents(paths: Sequence[str], *, start: tuple[int, int] = (0, 0),
                   subsets: Sequence[str] | None = None, skip_bad: bool = False,
                   counters: ReadCounters | None = None) -> Iterator[Document]:
    """Non-empty documents of `paths` in order, from cursor `start`, optionally only some Pile subsets."""
    counters = counters if counters is not None else ReadCounters()
    wanted = set(subsets) if subsets else None
    start_file, start_record = start
    sizes = [os.path.getsize(p) for p in paths]
    done_before = sum(sizes[:start_file])
    for file_index in range(start_file, len(paths)):
        path = paths[file_index]
        first = start_record if file_index == start_file else 0
        for record_index, text, subset, position in read_file_records(
                path, start_record=first, skip_bad=skip_bad, counters=counters):
            if text is None:
                continue
            if wanted is not None and subset not in wanted:
                counters.filtered_out += 1
                continue
            if not text:
                counters.empty_documents += 1
                continue
            repaired = repair_unicode(text)
            yield Document(repaired, subset, file_index, record_index, done_before + position, repaired is not text)
        done_before += sizes[file_index]
