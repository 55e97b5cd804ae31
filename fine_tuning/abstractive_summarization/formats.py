"""CNN/DailyMail as users have it, read into one stream of `Article`s.

| format   | file | fields |
|---|---|---|
| `jsonl`  | `*.jsonl`, one object per line | `id` (optional), `article`, `highlights` (the `cnn_dailymail` 3.0.0 columns) |
| `csv`    | `*.csv` with a header row | the same columns |
| `parquet`| `*.parquet` (the hub's files) | the same columns, read with pyarrow |
| `story`  | `*.story` (the original DeepMind files) | the text before the first `@highlight`; the paragraph after each `@highlight` is one highlight |
| `mlperf` | MLPerf's `cnn_eval.json`: a JSON list | `instruction`, `input` (article), `output` (reference) |

`--format auto` picks by suffix (`.json` is MLPerf's list). Directories are searched for
files of those suffixes. Highlights of `.story` files are joined with newlines and given a
final period when they lack one, as the 3.0.0 dataset builder did. Bad input (unreadable
file, missing column, malformed line) raises `InputDataError` naming the file and line.
"""
from __future__ import annotations

import csv
import glob
import json
import os
from dataclasses import dataclass
from typing import Iterator, Sequence

from input.errors import InputDataError

__all__ = ["FORMATS", "SUFFIXES", "Article", "expand_article_inputs", "format_of", "read_articles"]

SUFFIXES = {".jsonl": "jsonl", ".csv": "csv", ".parquet": "parquet", ".story": "story", ".json": "mlperf"}
FORMATS = ("auto",) + tuple(dict.fromkeys(SUFFIXES.values()))
COLUMNS = ("article", "highlights")
# Line endings that count as a finished sentence in a .story file (else " ." is added).
_END_TOKENS = (".", "!", "?", "...", "'", "`", '"', "\u2019", "\u201d", ")")


@dataclass(frozen=True)
class Article:
    id: str
    article: str
    summary: str
    path: str                   # the file it came from
    line: int                   # 1-based line (jsonl, csv), row (parquet), list item (mlperf), 1 (story)
    bytes_done: int             # on-disk bytes of all inputs consumed so far (for the progress bar)
    instruction: str | None = None   # MLPerf's per-sample instruction


def format_of(path: str, requested: str) -> str:
    if requested != "auto":
        return requested
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in SUFFIXES:
        raise InputDataError(f"{path}: cannot tell the format from the suffix {suffix or '(none)'}; use one of "
                             f"{', '.join(SUFFIXES)} or pass --format")
    return SUFFIXES[suffix]


def expand_article_inputs(specs: Sequence[str]) -> list[str]:
    """Files named by `specs` (files, directories searched recursively, globs), sorted per spec."""
    found: list[str] = []
    for spec in specs:
        if os.path.isfile(spec):
            matches = [spec]
        elif os.path.isdir(spec):
            matches = sorted(os.path.join(root, name) for root, _, names in os.walk(spec) for name in names
                             if os.path.splitext(name)[1].lower() in SUFFIXES)
        else:
            matches = sorted(p for p in glob.glob(spec, recursive=True) if os.path.isfile(p))
        if not matches:
            raise InputDataError(f"input {spec} matches no file ({', '.join(SUFFIXES)}); check the path or glob")
        found.extend(os.path.abspath(m) for m in matches)
    return list(dict.fromkeys(found))


def _bad(path: str, line: int | None, problem: str) -> InputDataError:
    where = f"{path} line {line}" if line is not None else path
    return InputDataError(f"{where}: {problem}")


def _text(value, path: str, line: int, column: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise _bad(path, line, f"column {column!r} is a {type(value).__name__}, not text")
    return value


def _read_jsonl(path: str, base: int) -> Iterator[Article]:
    position = 0
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            position += len(raw)
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
            except ValueError as err:
                raise _bad(path, number, f"not a JSON object ({err}); write one "
                                         '{"id", "article", "highlights"} object per line') from None
            if not isinstance(record, dict):
                raise _bad(path, number, f"a JSON {type(record).__name__}, not an object with "
                                         "article and highlights")
            missing = [c for c in COLUMNS if c not in record]
            if missing:
                raise _bad(path, number, f"missing key {missing[0]!r} (found {', '.join(sorted(record)) or 'none'}); "
                                         "the cnn_dailymail columns are id, article, highlights")
            yield Article(str(record.get("id", f"{os.path.basename(path)}:{number}")),
                          _text(record["article"], path, number, "article"),
                          _text(record["highlights"], path, number, "highlights"), path, number, base + position)


def _read_csv(path: str, base: int) -> Iterator[Article]:
    done = [0]          # characters read so far (a text file cannot tell() while iterated)

    def counted(handle):
        for text in handle:
            done[0] += len(text)
            yield text

    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(counted(f))
        try:
            header = reader.fieldnames or []
            missing = [c for c in COLUMNS if c not in header]
            if missing:
                raise _bad(path, 1, f"the header has no column {missing[0]!r} (found {', '.join(header) or 'none'}); "
                                    "the cnn_dailymail columns are id, article, highlights")
            for row in reader:
                number = reader.line_num
                if None in row:
                    raise _bad(path, number, f"{len(header) + len(row[None])} fields but the header names "
                                             f"{len(header)}; quote fields that hold commas")
                yield Article(row.get("id") or f"{os.path.basename(path)}:{number}",
                              _text(row["article"], path, number, "article"),
                              _text(row["highlights"], path, number, "highlights"), path, number,
                              base + done[0])
        except csv.Error as err:
            raise _bad(path, reader.line_num, f"not valid CSV ({err})") from None
        except UnicodeDecodeError as err:
            raise _bad(path, None, f"not UTF-8 text ({err})") from None


def _read_parquet(path: str, base: int) -> Iterator[Article]:
    import pyarrow.parquet as pq
    try:
        table = pq.ParquetFile(path)
    except Exception as err:     # pyarrow raises ArrowInvalid / OSError with its own message
        raise _bad(path, None, f"not a readable Parquet file ({err})") from None
    names = table.schema_arrow.names
    missing = [c for c in COLUMNS if c not in names]
    if missing:
        raise _bad(path, None, f"no column {missing[0]!r} (found {', '.join(names)}); the cnn_dailymail "
                               "columns are id, article, highlights")
    columns = [c for c in ("id",) + COLUMNS if c in names]
    total, size, number = max(table.metadata.num_rows, 1), os.path.getsize(path), 0
    for batch in table.iter_batches(batch_size=1024, columns=columns):
        rows = batch.to_pydict()
        for i in range(batch.num_rows):
            number += 1
            yield Article(str(rows["id"][i]) if "id" in rows else f"{os.path.basename(path)}:{number}",
                          _text(rows["article"][i], path, number, "article"),
                          _text(rows["highlights"][i], path, number, "highlights"), path, number,
                          base + size * number // total)


def _with_period(line: str) -> str:
    return line if line.endswith(_END_TOKENS) else line + " ."


def parse_story(text: str) -> tuple[str, str]:
    """(article, highlights) of a .story file: article paragraphs joined by spaces, one
    highlight per line."""
    article, highlights, next_is_highlight = [], [], False
    for line in (line.strip() for line in text.splitlines()):
        if not line:
            continue
        if line.startswith("@highlight"):
            next_is_highlight = True
        elif next_is_highlight:
            highlights.append(_with_period(line))
        else:
            article.append(_with_period(line))
    return " ".join(article), "\n".join(highlights)


def _read_story(path: str, base: int) -> Iterator[Article]:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as err:
        raise _bad(path, None, f"cannot read it as UTF-8 text ({err})") from None
    article, highlights = parse_story(text)
    yield Article(os.path.splitext(os.path.basename(path))[0], article, highlights, path, 1,
                  base + os.path.getsize(path))


def _read_mlperf(path: str, base: int) -> Iterator[Article]:
    try:
        with open(path, encoding="utf-8") as f:
            items = json.load(f)
    except json.JSONDecodeError as err:
        raise _bad(path, err.lineno, f"not valid JSON ({err.msg}); MLPerf's cnn_eval.json is a list of "
                                     '{"instruction", "input", "output"}') from None
    except (OSError, UnicodeDecodeError) as err:
        raise _bad(path, None, f"cannot read it ({err})") from None
    if not isinstance(items, list):
        raise _bad(path, 1, f"a JSON {type(items).__name__}, not MLPerf's list of "
                            '{"instruction", "input", "output"}; for one object per line use .jsonl')
    size = os.path.getsize(path)
    for index, item in enumerate(items):
        number = index + 1
        if not isinstance(item, dict) or "input" not in item or "output" not in item:
            raise _bad(path, None, f"item {index} has no 'input' and 'output' (MLPerf's keys: instruction, "
                                   "input, output)")
        instruction = item.get("instruction")
        yield Article(str(index), _text(item["input"], path, number, "input"),
                      _text(item["output"], path, number, "output"), path, number,
                      base + size * number // len(items),
                      instruction if isinstance(instruction, str) else None)


_READERS = {"jsonl": _read_jsonl, "csv": _read_csv, "parquet": _read_parquet, "story": _read_story,
            "mlperf": _read_mlperf}


def read_articles(paths: Sequence[str], file_format: str = "auto") -> Iterator[Article]:
    """Every article of `paths` in order (files as given; rows in file order)."""
    if file_format not in FORMATS:
        raise InputDataError(f"--format {file_format!r} is not one of {', '.join(FORMATS)}")
    base = 0
    for path in paths:
        try:
            yield from _READERS[format_of(path, file_format)](path, base)
        except OSError as err:
            raise _bad(path, None, f"cannot read it ({err.strerror or err})") from None
        base += os.path.getsize(path)
