"""Summarization records: the layout (TensorFlow Text) against a plain Python expectation, every
input format, the skip/truncate rules, the separator checks, errors, and resuming."""
from __future__ import annotations

import csv
import glob
import json
import os
import subprocess
import sys

import pytest
import tensorflow as tf

from fine_tuning.abstractive_summarization import layout
from fine_tuning.abstractive_summarization.prepare import prepare
from input.errors import InputDataError
from input.shards import ShardWriter
from tests.data_helpers import make_tiny_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EOS, SEP = 0, 400
VOCAB = 512            # model rows: the tiny tokenizer's 320 tokens, then free slots

ARTICLES = [  # (id, article, highlights)
    ("a1", "The quick brown fox jumps over the lazy dog.", "A fox jumps."),
    ("a2", "def add(a, b): return a + b", "Adds two numbers.\nReturns the sum."),
    ("a3", "", "An empty article is skipped."),
    ("a4", "The model reads the input and the mask.", "  "),
    ("a5", " ".join(["data model token window shard"] * 12), "A long article."),
    ("a6", "Unicode too: café, naïve.", "Short."),
]


def expected_record(article: list[int], summary: list[int], seq_len: int) -> dict:
    """The layout written out by hand: the issue's definition, position by position."""
    input_ids = [EOS] + article + [SEP] + summary
    labels = article + [EOS] + summary + [EOS]
    mask = [0] * (len(article) + 1) + [1] * (len(summary) + 1)
    pad = seq_len - len(input_ids)
    return {"input_ids": input_ids + [EOS] * pad, "labels": labels + [EOS] * pad, "input_mask": mask + [0] * pad}


def read_records(directory: str) -> list[dict]:
    spec = {name: tf.io.VarLenFeature(tf.int64) for name in ("input_ids", "labels", "input_mask")}
    out = []
    for path in sorted(glob.glob(os.path.join(directory, "*.tfrecord"))):
        for raw in tf.data.TFRecordDataset(path):
            parsed = tf.io.parse_single_example(raw, spec)
            out.append({k: tf.sparse.to_dense(v).numpy().tolist() for k, v in parsed.items()})
    return out


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return make_tiny_tokenizer(str(tmp_path_factory.mktemp("tok")))


def expectation(tokenizer, rows, seq_len, truncate=False):
    """(records, skipped reasons) expected for (article, summary) texts, written without the layout module."""
    records, skipped = [], {}
    for article_text, summary_text in rows:
        article = tokenizer.encode(article_text) if article_text.strip() else []
        summary = tokenizer.encode(summary_text) if summary_text.strip() else []
        if not article or not summary:
            reason = "empty_article" if not article else "empty_summary"
            skipped[reason] = skipped.get(reason, 0) + 1
            continue
        room = seq_len - 2 - len(summary)
        if len(article) > room:
            reason = "too_long" if not truncate else ("summary_too_long" if room < 1 else None)
            if reason:
                skipped[reason] = skipped.get(reason, 0) + 1
                continue
            article = article[:room]
        records.append(expected_record(article, summary, seq_len))
    return records, skipped


# ---------------------------------------------------------------------------- the layout itself

def test_layout_equals_the_hand_written_definition():
    articles = [[5, 6, 7], [8, 9, 10, 11, 12, 13, 14], [15], [16, 17]]
    summaries = [[20, 21], [22], [23, 24, 25, 26, 27], [28]]
    out = layout.lay_out_batch(articles, summaries, seq_len=9, eos_id=EOS, sep_id=SEP)
    for row, (a, s) in enumerate(zip(articles, summaries)):
        room = 9 - 2 - len(s)
        want = expected_record(a[:room], s, 9)
        for name in want:
            assert getattr(out, name)[row].tolist() == want[name], (row, name)
        assert out.input_mask[row].sum() == len(s) + 1      # the summary and its closing eos
    assert out.article_kept.tolist() == [3, 6, 1, 2]          # row 1 cut from 7 to 9 - 2 - 1 = 6


@pytest.mark.parametrize("article,summary,seq_len,truncate,reason", [
    (0, 3, 10, False, "empty_article"), (4, 0, 10, False, "empty_summary"), (6, 3, 10, False, "too_long"),
    (5, 3, 10, False, None), (6, 3, 10, True, None), (9, 8, 10, True, "summary_too_long"),
    (9, 7, 10, True, None)])
def test_skip_rules(article, summary, seq_len, truncate, reason):
    assert layout.skip_reason(article, summary, seq_len, truncate) == reason


# ---------------------------------------------------------------------------- formats

def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for i, a, h in rows:
            f.write(json.dumps({"id": i, "article": a, "highlights": h}) + "\n")
    return str(path)


def write_csv(path, rows):
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "article", "highlights"])
        writer.writerows(rows)
    return str(path)


def write_parquet(path, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq
    table = pa.table({"id": [r[0] for r in rows], "article": [r[1] for r in rows], "highlights": [r[2] for r in rows]})
    pq.write_table(table, str(path), row_group_size=2)
    return str(path)


def write_mlperf(path, rows):
    items = [{"instruction": layout.MLPERF_INSTRUCTION, "input": a, "output": h} for _, a, h in rows]
    path.write_text(json.dumps(items))
    return str(path)


def write_stories(directory, rows):
    os.makedirs(directory, exist_ok=True)
    for i, article, highlights in rows:
        paragraphs = [p for p in article.split(". ") if p]
        body = "\n\n".join(paragraphs) + "\n\n" + "".join(f"@highlight\n\n{h}\n\n" for h in highlights.split("\n"))
        (directory / f"{i}.story").write_text(body, encoding="utf-8")
    return str(directory)


@pytest.mark.parametrize("writer", [write_jsonl, write_csv, write_parquet, write_mlperf])
def test_every_tabular_format_gives_the_expected_records(tmp_path, tokenizer, writer):
    suffix = {write_jsonl: ".jsonl", write_csv: ".csv", write_parquet: ".parquet", write_mlperf: ".json"}[writer]
    source = writer(tmp_path / f"in{suffix}", ARTICLES)
    stats = prepare([source], str(tmp_path / "out"), tokenizer, max_sequence_length=48, sep_id=SEP,
                    model_vocab_size=VOCAB, shard_size=2, progress=False)
    want, skipped = expectation(tokenizer, [(a, h) for _, a, h in ARTICLES], 48)
    assert read_records(str(tmp_path / "out" / "train")) == want
    assert stats["examples"] == len(want) and stats["articles"] == len(ARTICLES)
    assert {k: v for k, v in stats["skipped"].items() if v} == skipped == {"empty_article": 1, "empty_summary": 1,
                                                                           "too_long": 1}
    on_disk = json.loads((tmp_path / "out" / "train" / "stats.json").read_text())
    assert on_disk["skipped"] == stats["skipped"] and on_disk["record_layout"] == "summarization"


def test_story_files_take_highlights_after_the_markers(tmp_path, tokenizer):
    rows = [ARTICLES[0], ARTICLES[1], ARTICLES[5]]
    source = write_stories(tmp_path / "stories", rows)
    prepare([source], str(tmp_path / "out"), tokenizer, max_sequence_length=48, sep_id=SEP,
            model_vocab_size=VOCAB, progress=False)
    # .story paragraphs are joined by spaces, each highlight on its own line, a period added where missing
    texts = {"a1": ("The quick brown fox jumps over the lazy dog.", "A fox jumps."),
             "a2": ("def add(a, b): return a + b .", "Adds two numbers.\nReturns the sum."),
             "a6": ("Unicode too: café, naïve.", "Short.")}
    want, _ = expectation(tokenizer, [texts[k] for k in sorted(texts)], 48)
    assert read_records(str(tmp_path / "out" / "train")) == want


def test_truncate_article_cuts_the_end_so_the_summary_fits(tmp_path, tokenizer):
    source = write_jsonl(tmp_path / "in.jsonl", ARTICLES)
    stats = prepare([source], str(tmp_path / "out"), tokenizer, max_sequence_length=20, sep_id=SEP,
                    model_vocab_size=VOCAB, truncate_article=True, progress=False)
    want, skipped = expectation(tokenizer, [(a, h) for _, a, h in ARTICLES], 20, truncate=True)
    assert read_records(str(tmp_path / "out" / "train")) == want
    assert stats["truncated_articles"] >= 2 and "too_long" not in skipped
    assert stats["skipped"]["too_long"] == 0


def test_mlperf_prompt_wraps_and_caps_the_input(tmp_path, tokenizer):
    long_article = " ".join(["the model reads a window of tokens"] * 400)          # > 1917 tokens
    rows = [("0", long_article, "A summary."), ("1", "Short news.", "Shorter.")]
    source = write_mlperf(tmp_path / "cnn_eval.json", rows)
    stats = prepare([source], str(tmp_path / "out"), tokenizer, max_sequence_length=1940, sep_id=SEP,
                    model_vocab_size=VOCAB, prompt="mlperf", progress=False)
    records = read_records(str(tmp_path / "out" / "train"))
    long_prompt = tokenizer.encode(layout.prompt_text(long_article, "mlperf"))
    short_prompt = tokenizer.encode(layout.prompt_text("Short news.", "mlperf"))
    assert records == [expected_record(long_prompt[:1917], tokenizer.encode("A summary."), 1940),
                       expected_record(short_prompt, tokenizer.encode("Shorter."), 1940)]
    assert records[0]["input_ids"].index(SEP) == 1918        # [eos] + 1917 prompt tokens + [sep]: 1919 inputs
    assert stats["capped_prompts"] == 1
    assert layout.prompt_text("X", "mlperf").endswith("### Input:\nX\n\n### Response:")


# ---------------------------------------------------------------------------- separator and errors

def test_separator_checks(tmp_path, tokenizer):
    source = write_jsonl(tmp_path / "in.jsonl", ARTICLES[:2])
    common = dict(max_sequence_length=64, progress=False)
    with pytest.raises(InputDataError, match="collides with the tokenizer's token"):
        prepare([source], str(tmp_path / "a"), tokenizer, sep_id=42, model_vocab_size=VOCAB, **common)
    with pytest.raises(InputDataError, match="eos id"):
        prepare([source], str(tmp_path / "b"), tokenizer, sep_id=tokenizer.eos_id, model_vocab_size=VOCAB, **common)
    with pytest.raises(InputDataError, match="outside the model's vocabulary.*--sep-id 320"):
        prepare([source], str(tmp_path / "c"), tokenizer, sep_id=VOCAB, model_vocab_size=VOCAB, **common)
    # a tokenizer that fills the model: the default slot is past the end; a never-produced byte token is free
    free = layout.unreachable_byte_token_ids(tokenizer)
    with pytest.raises(InputDataError, match=f"--sep-id {free[0]}"):
        prepare([source], str(tmp_path / "d"), tokenizer, model_vocab_size=tokenizer.vocab_size, **common)
    stats = prepare([source], str(tmp_path / "e"), tokenizer, sep_id=free[0], model_vocab_size=tokenizer.vocab_size,
                    **common)
    assert stats["examples"] == 2 and stats["settings"]["sep_id"] == free[0]
    assert layout.default_sep_id(tokenizer) == tokenizer.base_vocab_size == 320


def test_unreachable_byte_tokens_never_come_out_of_text(tokenizer):
    free = set(layout.unreachable_byte_token_ids(tokenizer))
    assert len(free) == 13                           # 0xC0, 0xC1, 0xF5..0xFF
    every_char = "".join(chr(c) for c in range(0x20, 0x3000) if not 0xD800 <= c < 0xE000) + "\U0001F642\n\t"
    assert not free & set(tokenizer.encode(every_char))


@pytest.mark.parametrize("content,message", [
    ('{"id": "x", "article": "a", "highlights": "b"}\n{"id": "y", "article": "a"}\n', r"in.jsonl line 2: missing key 'highlights'"),
    ('{"id": "x", "article": "a", "highlights": "b"}\n{not json\n', r"in.jsonl line 2: not a JSON object"),
])
def test_bad_jsonl_names_file_and_line(tmp_path, tokenizer, content, message):
    (tmp_path / "in.jsonl").write_text(content)
    with pytest.raises(InputDataError, match=message):
        prepare([str(tmp_path / "in.jsonl")], str(tmp_path / "out"), tokenizer, max_sequence_length=32,
                sep_id=SEP, model_vocab_size=VOCAB, progress=False)
    assert not glob.glob(str(tmp_path / "out" / "train" / "*.tfrecord"))
    assert not os.path.exists(tmp_path / "out" / "train" / "stats.json")


def test_bad_csv_header_and_parquet_column(tmp_path, tokenizer):
    (tmp_path / "in.csv").write_text("id,text,highlights\n1,a,b\n")
    with pytest.raises(InputDataError, match=r"in.csv line 1: the header has no column 'article'"):
        prepare([str(tmp_path / "in.csv")], str(tmp_path / "o1"), tokenizer, max_sequence_length=32, sep_id=SEP,
                model_vocab_size=VOCAB, progress=False)
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"article": ["a"]}), str(tmp_path / "in.parquet"))
    with pytest.raises(InputDataError, match=r"in.parquet: no column 'highlights'"):
        prepare([str(tmp_path / "in.parquet")], str(tmp_path / "o2"), tokenizer, max_sequence_length=32,
                sep_id=SEP, model_vocab_size=VOCAB, progress=False)


def test_no_example_at_all_is_an_error(tmp_path, tokenizer):
    source = write_jsonl(tmp_path / "in.jsonl", [ARTICLES[2], ARTICLES[3], ARTICLES[4]])
    with pytest.raises(InputDataError, match=r"none of the 3 articles became an example.*1 empty_article"):
        prepare([source], str(tmp_path / "out"), tokenizer, max_sequence_length=24, sep_id=SEP,
                model_vocab_size=VOCAB, progress=False)
    assert not os.path.exists(tmp_path / "out" / "train" / "stats.json")


def test_cli_bad_input_is_one_error_line_and_exit_2(tmp_path, tokenizer):
    (tmp_path / "in.jsonl").write_text('{"id": "x", "article": "a"}\n')
    tokenizer_dir = os.path.dirname(tokenizer.source) if os.path.isfile(tokenizer.source) else tokenizer.source
    result = subprocess.run([sys.executable, "-m", "fine_tuning.abstractive_summarization.prepare", "--input",
                             str(tmp_path / "in.jsonl"), "--output-dir", str(tmp_path / "out"), "--tokenizer",
                             tokenizer_dir, "--max-sequence-length", "32", "--sep-id", str(SEP),
                             "--model-vocab-size", str(VOCAB), "--workers", "0", "--no-progress"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "in.jsonl line 1: missing key 'highlights'" in result.stderr and "Traceback" not in result.stderr


# ---------------------------------------------------------------------------- resuming

def test_an_interrupted_run_resumes_to_the_same_bytes(tmp_path, tokenizer, monkeypatch):
    rows = [(str(i), f"Article {i}: " + " ".join(["model data token"] * (1 + i % 5)), f"Summary {i}.")
            for i in range(23)] + [ARTICLES[2]]
    source = write_jsonl(tmp_path / "in.jsonl", rows)
    common = dict(max_sequence_length=64, sep_id=SEP, model_vocab_size=VOCAB, shard_size=4, progress=False,
                  batch_articles=5)
    whole = prepare([source], str(tmp_path / "whole"), tokenizer, **common)
    assert whole["examples"] == 23 and len(whole["shards"]) == 6

    written, real_write = [0], ShardWriter.write

    def dying_write(self, record):
        written[0] += 1
        if written[0] == 11:         # during the third shard
            raise KeyboardInterrupt
        return real_write(self, record)

    monkeypatch.setattr(ShardWriter, "write", dying_write)
    with pytest.raises(KeyboardInterrupt):
        prepare([source], str(tmp_path / "resumed"), tokenizer, **common)
    monkeypatch.setattr(ShardWriter, "write", real_write)
    out = tmp_path / "resumed" / "train"
    assert sorted(os.listdir(out)) == [".progress", "train-00000.tfrecord", "train-00001.tfrecord"]
    resumed = prepare([source], str(tmp_path / "resumed"), tokenizer, **common)
    assert resumed == whole
    for name in sorted(os.listdir(tmp_path / "whole" / "train")):
        if name.endswith(".tfrecord"):
            assert (out / name).read_bytes() == (tmp_path / "whole" / "train" / name).read_bytes()
    with pytest.raises(InputDataError, match="other settings"):
        prepare([source], str(tmp_path / "resumed"), tokenizer, **{**common, "max_sequence_length": 65})
