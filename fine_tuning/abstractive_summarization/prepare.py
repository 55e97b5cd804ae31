"""CNN/DailyMail (or any article/summary pairs) to summarization TFRecords.

    python -m fine_tuning.abstractive_summarization.prepare --input data/cnn_dailymail/train.parquet \\
        --output-dir data/cnn_dm_records --split train --tokenizer EleutherAI/gpt-j-6b \\
        --max-sequence-length 2048 --truncate-article

Reads the formats of `formats.py` (jsonl, csv, parquet, .story, MLPerf's cnn_eval.json) and
writes one example per record, never packed, in the layout of `layout.py`:
`input_ids = [eos] + article + [sep] + summary`, `labels = article + [eos] + summary + [eos]`,
`input_mask` 1 exactly on the 1 + |summary| positions that predict the summary and its eos.

Output: `<output-dir>/<split>/<split>-00000.tfrecord`, ... and `stats.json` (articles read,
examples written, skipped examples by reason, truncated articles, token counts, shards,
settings). Examples that do not fit are skipped and counted (`too_long`) unless
`--truncate-article` cuts the article's end so the whole summary fits (`summary_too_long`
when even a one-token article would not); empty articles and summaries are skipped and
counted. `--prompt mlperf` wraps the article in MLPerf's Alpaca template and caps
`[eos] + prompt + [sep]` at 1,919 tokens, as MLPerf caps its input.

Re-running the same command resumes: finished shards are kept (input/shards.py), reading
restarts after the last article they hold, and the bytes equal an uninterrupted run's.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Iterator, Sequence

from config.cli import ArgumentParser
from config.quiet import add_verbose_flag, quiet_tensorflow

if __name__ == "__main__":      # before the imports below load TensorFlow (--verbose shows its start-up lines)
    quiet_tensorflow("--verbose" in sys.argv[1:])

import numpy as np

from fine_tuning.abstractive_summarization.formats import (FORMATS, Article, expand_article_inputs, format_of,
                                                           read_articles)
from fine_tuning.abstractive_summarization.layout import (FRAME_TOKENS, MLPERF_MAX_INPUT_TOKENS, PROMPTS,
                                                          SkipReason, check_sep_id, default_sep_id,
                                                          lay_out_batch, prompt_text, skip_reason)
from input.errors import InputDataError
from input.records import serialize_example
from input.shards import ProgressLog, ShardWriter, write_json_atomic
from input.tokenize_pool import TokenizePool
from input.tokenizer import EOS_TOKEN, GptTokenizer, load_tokenizer

__all__ = ["prepare", "main", "RECORD_LAYOUT"]

FORMAT_VERSION = 1
RECORD_LAYOUT = "summarization"       # stats.json's mark, checked by SummarizationTfRecordsProcessor
GPTJ_VOCAB_SIZE = 50400
BATCH_ARTICLES = 256                  # articles tokenized and laid out together


class Tally:
    """Running counts of one run; `snapshot()` is what a progress record stores."""

    FIELDS = ("articles", "examples", "truncated_articles", "truncated_article_tokens", "capped_prompts",
              "article_tokens", "summary_tokens")

    def __init__(self, snapshot: dict | None = None):
        snapshot = snapshot or {}
        for name in self.FIELDS:
            setattr(self, name, snapshot.get(name, 0))
        self.skipped = {reason: snapshot.get("skipped", {}).get(reason, 0) for reason in SkipReason.ALL}

    def snapshot(self) -> dict:
        return {**{name: getattr(self, name) for name in self.FIELDS}, "skipped": dict(self.skipped)}


def _batches(articles: Iterator[Article], size: int) -> Iterator[list[Article]]:
    batch: list[Article] = []
    for article in articles:
        batch.append(article)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _tokenized(pool: TokenizePool, batches: Iterator[list[Article]], prompt: str
               ) -> Iterator[tuple[list[Article], list[list[int]], list[list[int]]]]:
    """(articles, article token lists, summary token lists) per batch, article text in the prompt."""
    def tasks():
        for batch in batches:
            texts = []
            for a in batch:
                texts += [prompt_text(a.article, prompt, a.instruction) if a.article.strip() else "",
                          a.summary if a.summary.strip() else ""]
            yield batch, texts

    for batch, tokens, lengths in pool.map(tasks()):
        ends = np.cumsum(lengths)
        pieces = [tokens[end - length:end - 1].tolist() for end, length in zip(ends, lengths)]   # drop the eos
        yield batch, pieces[0::2], pieces[1::2]


def _check_no_sep(article: Article, ids: list[int], sep_id: int, what: str) -> None:
    if sep_id in ids:
        raise InputDataError(f"{article.path} line {article.line}: the {what} tokenizes to the separator id "
                             f"{sep_id} (the text holds that added token); pass another --sep-id")


def _progress_bar(total: int, initial: int, desc: str, enabled: bool):
    from tqdm import tqdm
    return tqdm(total=total, initial=initial, desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
                smoothing=0.05, disable=not enabled, dynamic_ncols=True, file=sys.stderr)


def prepare(inputs: Sequence[str], output_dir: str, tokenizer: GptTokenizer | str, *, max_sequence_length: int,
            file_format: str = "auto", prompt: str = "none", truncate_article: bool = False,
            sep_id: int | None = None, model_vocab_size: int = GPTJ_VOCAB_SIZE, split: str = "train",
            shard_size: int = 10000, workers: int = 0, overwrite: bool = False, progress: bool = True,
            batch_articles: int = BATCH_ARTICLES) -> dict:
    """Write `<output_dir>/<split>/` and return its stats (also in its stats.json)."""
    if max_sequence_length <= FRAME_TOKENS + 1:
        raise InputDataError(f"--max-sequence-length {max_sequence_length} leaves no room for an article and a "
                             f"summary; use at least {FRAME_TOKENS + 2}")
    if shard_size < 1:
        raise InputDataError(f"--shard-size {shard_size} must be positive")
    if prompt not in PROMPTS:
        raise InputDataError(f"--prompt {prompt!r} is not one of {', '.join(PROMPTS)}")
    if not isinstance(tokenizer, GptTokenizer):
        tokenizer = load_tokenizer(tokenizer)
    tokenizer.check_fits_model(model_vocab_size, "--model-vocab-size")
    sep_id = default_sep_id(tokenizer) if sep_id is None else sep_id
    check_sep_id(sep_id, tokenizer, model_vocab_size)
    paths = expand_article_inputs(inputs)
    formats = [format_of(p, file_format) for p in paths]
    settings = {"format": FORMAT_VERSION, "record_layout": RECORD_LAYOUT,
                "inputs": [[p, os.path.getsize(p), f] for p, f in zip(paths, formats)],
                "tokenizer": tokenizer.fingerprint, "eos_id": tokenizer.eos_id, "sep_id": sep_id,
                "max_sequence_length": max_sequence_length, "prompt": prompt, "truncate_article": truncate_article,
                "shard_size": shard_size, "split": split, "model_vocab_size": model_vocab_size}
    directory = os.path.join(output_dir, split)
    os.makedirs(directory, exist_ok=True)
    log = ProgressLog(directory)
    log.check_settings(settings, overwrite)
    stats_path = os.path.join(directory, "stats.json")
    done, last = log.resume_point(split)
    if last is not None and last["next"] is None and os.path.isfile(stats_path):
        import json
        with open(stats_path, encoding="utf-8") as f:
            return json.load(f)                    # finished earlier: nothing to redo
    tally = Tally(last["state"] if last else None)
    shards = [{k: r[k] for k in ("file", "examples", "bytes")} for r in done]
    start = tally.articles if last is None or last["next"] is not None else None
    writer = ShardWriter(directory, split, shard_size, first_index=len(done))
    cap = MLPERF_MAX_INPUT_TOKENS - FRAME_TOKENS if prompt == "mlperf" else None

    sizes = [os.path.getsize(p) for p in paths]
    bar = _progress_bar(sum(sizes), 0, split, progress)
    started, articles_before = time.perf_counter(), tally.articles
    try:
        if start is not None:          # None: every shard is written, only stats.json is missing
            stream = (a for i, a in enumerate(read_articles(paths, file_format)) if i >= start)
            with TokenizePool(tokenizer, workers) as pool:
                for batch, article_ids, summary_ids in _tokenized(pool, _batches(stream, batch_articles), prompt):
                    _write_batch(batch, article_ids, summary_ids, cap=cap, seq_len=max_sequence_length,
                                 truncate_article=truncate_article, tokenizer=tokenizer, sep_id=sep_id,
                                 writer=writer, log=log, tally=tally, shards=shards)
                    bar.update(batch[-1].bytes_done - bar.n)
                    rate = (tally.articles - articles_before) / max(time.perf_counter() - started, 1e-9)
                    bar.set_postfix(articles=f"{rate:.0f}/s", examples=tally.examples, refresh=False)
            info = writer.close()
            if info is not None:
                shards.append(info.to_dict())
                log.record(info, None, tally.snapshot())
        bar.update(bar.total - bar.n)
    except BaseException:
        writer.abort()
        raise
    finally:
        bar.close()
    if tally.examples == 0:
        skipped = ", ".join(f"{n} {r}" for r, n in tally.skipped.items() if n) or "none"
        raise InputDataError(f"{', '.join(paths)}: none of the {tally.articles} articles became an example "
                             f"(skipped: {skipped}); raise --max-sequence-length, pass --truncate-article, "
                             "or check the columns")
    stats = {"split": split, "record_layout": RECORD_LAYOUT, **tally.snapshot(), "shards": shards,
             "settings": settings}
    write_json_atomic(stats_path, stats)
    return stats


def _write_batch(batch: list[Article], article_ids: list[list[int]], summary_ids: list[list[int]], *,
                 cap: int | None, seq_len: int, truncate_article: bool, tokenizer: GptTokenizer, sep_id: int,
                 writer: ShardWriter, log: ProgressLog, tally: Tally, shards: list[dict]) -> None:
    """Lay out the kept examples of one batch and write them in input order, recording where a
    resumed run starts after every completed shard."""
    capped = [False] * len(batch)
    reasons = []
    for i, article in enumerate(batch):
        _check_no_sep(article, article_ids[i], sep_id, "article")
        _check_no_sep(article, summary_ids[i], sep_id, "summary")
        if cap is not None and len(article_ids[i]) > cap:
            article_ids[i], capped[i] = article_ids[i][:cap], True
        reasons.append(skip_reason(len(article_ids[i]), len(summary_ids[i]), seq_len, truncate_article))
    kept = [i for i, reason in enumerate(reasons) if reason is None]
    records = lay_out_batch([article_ids[i] for i in kept], [summary_ids[i] for i in kept], seq_len=seq_len,
                            eos_id=tokenizer.eos_id, sep_id=sep_id) if kept else None
    row_of = {i: row for row, i in enumerate(kept)}
    for i, article in enumerate(batch):
        tally.articles += 1
        tally.capped_prompts += capped[i]
        if reasons[i] is not None:
            tally.skipped[reasons[i]] += 1
            continue
        row = row_of[i]
        kept_tokens = int(records.article_kept[row])
        tally.examples += 1
        tally.truncated_articles += kept_tokens < len(article_ids[i])
        tally.truncated_article_tokens += len(article_ids[i]) - kept_tokens
        tally.article_tokens += kept_tokens
        tally.summary_tokens += len(summary_ids[i])
        info = writer.write(serialize_example(records.input_ids[row], records.labels[row], records.input_mask[row]))
        if info is not None:
            shards.append(info.to_dict())
            log.record(info, {"article": tally.articles}, tally.snapshot())


def _parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="python -m fine_tuning.abstractive_summarization.prepare",
        description="Article/summary pairs (CNN/DailyMail jsonl, csv, parquet, .story, MLPerf cnn_eval.json) "
                    "to summarization TFRecords: one example per record, loss on the summary only.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--input", nargs="+", required=True, help="files, directories (searched recursively) or globs")
    parser.add_argument("--output-dir", required=True, help="records go to <output-dir>/<split>/")
    parser.add_argument("--tokenizer", required=True,
                        help="directory with tokenizer.json or vocab.json+merges.txt, a tokenizer.json, or a hub "
                             "id such as EleutherAI/gpt-j-6b")
    parser.add_argument("--max-sequence-length", type=int, required=True,
                        help="tokens per record (S); must equal the params' max_sequence_length")
    parser.add_argument("--format", default="auto", choices=FORMATS,
                        help="input format; auto: by suffix (.jsonl .csv .parquet .story, .json = MLPerf's list)")
    parser.add_argument("--prompt", default="none", choices=PROMPTS,
                        help="none: the article as is; mlperf: MLPerf's Alpaca template, input capped at "
                             f"{MLPERF_MAX_INPUT_TOKENS} tokens")
    parser.add_argument("--truncate-article", action="store_true",
                        help="cut a long article's end so the whole summary fits (default: skip the example)")
    parser.add_argument("--sep-id", type=int, default=None,
                        help="separator id between article and summary (default: the first id after the "
                             "tokenizer's vocabulary, 50257 for GPT-J)")
    parser.add_argument("--model-vocab-size", type=int, default=GPTJ_VOCAB_SIZE,
                        help="the model's vocabulary rows (model.vocab_size): the separator must be below it")
    parser.add_argument("--split", default="train", help="name of the split (folder and shard prefix)")
    parser.add_argument("--shard-size", type=int, default=10000, help="examples per shard file")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="tokenizer processes (0: tokenize in this process)")
    parser.add_argument("--eos-token", default=EOS_TOKEN, help="the tokenizer's end-of-text token")
    parser.add_argument("--overwrite", action="store_true", help="discard the records of an earlier run")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_verbose_flag(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        tokenizer = load_tokenizer(args.tokenizer, eos_token=args.eos_token)
        stats = prepare(args.input, args.output_dir, tokenizer, max_sequence_length=args.max_sequence_length,
                        file_format=args.format, prompt=args.prompt, truncate_article=args.truncate_article,
                        sep_id=args.sep_id, model_vocab_size=args.model_vocab_size, split=args.split,
                        shard_size=args.shard_size, workers=args.workers, overwrite=args.overwrite,
                        progress=not args.no_progress)
    except (InputDataError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    skipped = ", ".join(f"{reason} {count}" for reason, count in stats["skipped"].items())
    print(f"{stats['split']}: {stats['articles']} articles -> {stats['examples']} examples in "
          f"{len(stats['shards'])} shards; skipped: {skipped}; truncated articles: {stats['truncated_articles']} "
          f"({stats['truncated_article_tokens']} tokens cut); MLPerf-capped prompts: {stats['capped_prompts']}; "
          f"sep id {stats['settings']['sep_id']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
