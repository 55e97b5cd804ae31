"""Summarize every article with the project's generation module and score it with ROUGE.

    python -m fine_tuning.abstractive_summarization.evaluate --params runs/cnn/params.yaml \\
        --model-dir runs/cnn --input data/cnn_dailymail/validation.parquet \\
        --tokenizer EleutherAI/gpt-j-6b --output-dir runs/cnn/rouge

MLPerf's settings are the defaults: beam search with 4 beams and early stopping, 30 to 128
new tokens, the input capped at 1,919 tokens (the article's end is cut), batches left
padded with eos. The prompt is framed as the training records frame the article,
`[eos] + article + [sep]` (`layout.py`), and generation stops at eos; `--raw-prompt` feeds
the article (or MLPerf's template with `--prompt mlperf`) without that frame, as MLPerf
feeds its reference checkpoint.

Outputs in `--output-dir`: `predictions.jsonl` (one line per article: index, id, reference,
prediction, token counts, generated ids without the final eos) appended one whole batch at a time and flushed to disk, so a
killed run keeps every finished batch and a re-run of the same command continues after
them (a partly written last line is dropped and its batch redone); `rouge.json` (ROUGE-1,
-2, -L, -Lsum x 100 and MLPerf's gen_len / gen_num, `rouge.py`) at the end;
`settings.json`, which a re-run must match.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from typing import Sequence

from config.cli import ArgumentParser
from generation.config import COMPILE_MODES
from generation.flags import add_hf_checkpoint_flag, add_weight_format_flag
from config.quiet import add_verbose_flag, quiet_tensorflow

if __name__ == "__main__":      # before the imports below load TensorFlow (--verbose shows its start-up lines)
    quiet_tensorflow("--verbose" in sys.argv[1:])

from config.files import atomic_write_text
from fine_tuning.abstractive_summarization.formats import FORMATS, expand_article_inputs, read_articles
from fine_tuning.abstractive_summarization.layout import (MLPERF_MAX_INPUT_TOKENS, PROMPTS, check_sep_id,
                                                          default_sep_id, generation_prompt, prompt_text)
from fine_tuning.abstractive_summarization.rouge import score_summaries
from input.errors import InputDataError
from input.tokenizer import GptTokenizer
from runtime import preflight
from runtime.peak_memory import Decoding, Estimate, generation_estimate

__all__ = ["EvalArticle", "load_eval_articles", "mlperf_generation_config", "summarize_batch", "evaluate", "main"]

PREDICTIONS, ROUGE, SETTINGS = "predictions.jsonl", "rouge.json", "settings.json"


@dataclass(frozen=True)
class EvalArticle:
    index: int                 # position in the input: the resume key (ids may repeat)
    id: str
    reference: str
    prompt_ids: list[int]
    article_tokens_cut: int


def mlperf_generation_config(eos_id: int, num_beams: int = 4, min_new_tokens: int = 30, max_new_tokens: int = 128):
    """MLPerf GPT-J's decoding: beam search, early stopping, stop and pad with eos."""
    from generation.config import GenerationConfig
    return GenerationConfig(max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, num_beams=num_beams,
                            early_stopping=num_beams > 1, stop_token_ids=(eos_id,), pad_token_id=eos_id)


def load_eval_articles(paths: Sequence[str], tokenizer: GptTokenizer, *, file_format: str = "auto",
                       prompt: str = "none", sep_id: int | None, max_input_tokens: int = MLPERF_MAX_INPUT_TOKENS,
                       limit: int | None = None) -> list[EvalArticle]:
    """The first `limit` articles of `paths` with their generation prompts (empty articles are
    errors here: every reference must get a prediction)."""
    articles = []
    for article in read_articles(paths, file_format):
        if limit is not None and len(articles) >= limit:
            break
        if not article.article.strip():
            raise InputDataError(f"{article.path} line {article.line}: the article is empty; evaluation needs "
                                 "text to summarize for every reference")
        articles.append(article)
    if not articles:
        raise InputDataError(f"{', '.join(paths)}: no article to evaluate")
    texts = [prompt_text(a.article, prompt, a.instruction) for a in articles]
    out = []
    for index, (article, ids) in enumerate(zip(articles, tokenizer.encode_batch(texts))):
        prompt_ids, cut = generation_prompt(ids, eos_id=tokenizer.eos_id, sep_id=sep_id,
                                            max_input_tokens=max_input_tokens)
        out.append(EvalArticle(index, article.id, article.summary, prompt_ids, cut))
    return out


def summarize_batch(generator, tokenizer: GptTokenizer, prompts: list[list[int]], config, batch_size: int
                    ) -> list[tuple[str, list[int], str]]:
    """(summary text, generated ids without the final eos, finish reason) per prompt. A short
    batch is filled with copies of its last prompt so one compiled decoder serves every batch
    (rows are independent; the copies are dropped)."""
    filled = prompts + [prompts[-1]] * (batch_size - len(prompts))
    results = generator.generate(filled, config)[:len(prompts)]
    out = []
    for result in results:
        ids = result.token_ids[:-1] if result.finish_reason == "stop" else result.token_ids
        out.append((tokenizer.decode(ids, skip_unknown=True), ids, result.finish_reason))
    return out


class PredictionsFile:
    """predictions.jsonl: whole batches appended with one write + fsync; reading drops a torn last line."""

    def __init__(self, path: str):
        self.path = path

    def load(self) -> dict[int, dict]:
        if not os.path.isfile(self.path):
            return {}
        with open(self.path, "rb") as f:
            data = f.read()
        whole = data[:data.rfind(b"\n") + 1]
        if len(whole) != len(data):                  # killed mid-write: drop the torn line
            with open(self.path, "r+b") as f:
                f.truncate(len(whole))
        records = {}
        for number, line in enumerate(whole.decode("utf-8").splitlines(), 1):
            try:
                record = json.loads(line)
                records[int(record["index"])] = record
            except (ValueError, KeyError, TypeError) as err:
                raise InputDataError(f"{self.path} line {number}: not a prediction record ({err}); delete the "
                                     "file or pass --overwrite to start afresh") from None
        return records

    def append(self, records: list[dict]) -> None:
        payload = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            written = 0
            while written < len(payload):
                written += os.write(fd, payload[written:])
            os.fsync(fd)
        finally:
            os.close(fd)


def _check_settings(output_dir: str, settings: dict, overwrite: bool) -> None:
    path = os.path.join(output_dir, SETTINGS)
    if overwrite:
        for name in (PREDICTIONS, ROUGE, SETTINGS):
            if os.path.exists(os.path.join(output_dir, name)):
                os.unlink(os.path.join(output_dir, name))
    elif os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            old = json.load(f)
        if old != settings:
            key = next(k for k in sorted(set(old) | set(settings)) if old.get(k) != settings.get(k))
            raise InputDataError(f"{output_dir} holds predictions made with other settings ({key}: {old.get(key)!r} "
                                 f"then, {settings.get(key)!r} now); pass --overwrite or choose another --output-dir")
    elif os.path.isfile(os.path.join(output_dir, PREDICTIONS)):
        raise InputDataError(f"{output_dir}/{PREDICTIONS} exists without {SETTINGS}; pass --overwrite or choose "
                             "another --output-dir")
    atomic_write_text(path, json.dumps(settings, indent=1, sort_keys=True))


def evaluate(model, tokenizer: GptTokenizer, articles: list[EvalArticle], config, output_dir: str, *,
             batch_size: int = 8, settings: dict | None = None, overwrite: bool = False, progress: bool = True,
             compile_mode: str = "xla", length_multiple: int = 32, generator=None) -> dict:
    """Generate the missing predictions batch by batch, then score all of them; returns rouge.json's content.
    `generator`: a Generator of `model` to reuse (its compiled decoders), else a new one."""
    from tqdm import tqdm

    from generation.generator import Generator

    os.makedirs(output_dir, exist_ok=True)
    _check_settings(output_dir, settings or {}, overwrite)
    predictions = PredictionsFile(os.path.join(output_dir, PREDICTIONS))
    done = predictions.load()
    pending = [a for a in articles if a.index not in done]
    if generator is None:
        generator = Generator(model, compile_mode=compile_mode, length_multiple=length_multiple)
    batch_size = max(1, min(batch_size, len(pending) or 1))
    started, generated = time.perf_counter(), 0
    with tqdm(total=len(articles), initial=len(articles) - len(pending), unit="article", desc="summarize",
              disable=not progress, dynamic_ncols=True, file=sys.stderr) as bar:
        for start in range(0, len(pending), batch_size):
            chunk = pending[start:start + batch_size]
            outputs = summarize_batch(generator, tokenizer, [a.prompt_ids for a in chunk], config, batch_size)
            records = [{"index": a.index, "id": a.id, "reference": a.reference, "prediction": text,
                        "prompt_tokens": len(a.prompt_ids), "article_tokens_cut": a.article_tokens_cut,
                        "generated_tokens": len(ids), "generated_ids": ids, "finish_reason": finish}
                       for a, (text, ids, finish) in zip(chunk, outputs)]
            predictions.append(records)
            done.update({r["index"]: r for r in records})
            generated += sum(r["generated_tokens"] for r in records)
            bar.update(len(chunk))
            bar.set_postfix(tokens=f"{generated / max(time.perf_counter() - started, 1e-9):.1f}/s", refresh=False)
    scored = [done[a.index] for a in articles]
    result = score_summaries([r["prediction"] for r in scored], [r["reference"] for r in scored])
    result["articles"] = len(scored)
    atomic_write_text(os.path.join(output_dir, ROUGE), json.dumps(result, indent=1))
    return result


def _parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="python -m fine_tuning.abstractive_summarization.evaluate",
        description="Summarize articles with a (fine-tuned) GPT-J and score ROUGE-1/2/L/Lsum as MLPerf does.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--params", default=None,
                        help="params YAML (its model: section describes the checkpoint); optional with --hf-checkpoint")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model-dir", help="a training run's directory: its latest checkpoint")
    source.add_argument("--checkpoint-path", help="a checkpoint prefix or directory (e.g. a converted model)")
    add_hf_checkpoint_flag(source)
    add_weight_format_flag(parser)
    parser.add_argument("--input", nargs="+", required=True,
                        help="articles with references: jsonl/csv/parquet/.story/MLPerf cnn_eval.json")
    parser.add_argument("--format", default="auto", choices=FORMATS,
                        help="input format (auto: by file name and content)")
    parser.add_argument("--tokenizer", required=True, help="tokenizer directory, tokenizer.json or hub id")
    parser.add_argument("--output-dir", required=True, help="predictions.jsonl, rouge.json, settings.json go here")
    parser.add_argument("--limit", type=int, default=None, help="only the first N articles")
    parser.add_argument("--num-beams", type=int, default=4, help="beam search width")
    parser.add_argument("--greedy", action="store_true", help="greedy decoding (same as --num-beams 1)")
    parser.add_argument("--min-new-tokens", type=int, default=30,
                        help="the end-of-text token is suppressed before this many new tokens (MLPerf: 30)")
    parser.add_argument("--max-new-tokens", type=int, default=128,
                        help="at most this many new tokens per summary (MLPerf: 128)")
    parser.add_argument("--max-input-tokens", type=int, default=MLPERF_MAX_INPUT_TOKENS,
                        help="cap on the prompt, frame included (the article's end is cut)")
    parser.add_argument("--prompt", default="none", choices=PROMPTS, help="as given to prepare")
    parser.add_argument("--sep-id", type=int, default=None, help="as given to prepare (default: the same default)")
    parser.add_argument("--raw-prompt", action="store_true",
                        help="no [eos] ... [sep] frame: for models not fine-tuned on prepare's records")
    parser.add_argument("--batch-size", type=int, default=8, help="articles decoded together")
    parser.add_argument("--generation-compile", choices=COMPILE_MODES, default="xla",
                        help="how the decode step runs: XLA (fastest), graph, or eager")
    parser.add_argument("--length-multiple", type=int, default=32,
                        help="prompt slots are rounded up to this (fewer shapes, fewer compilations)")
    parser.add_argument("--overwrite", action="store_true", help="discard predictions of an earlier run")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    preflight.add_skip_flag(parser)
    add_verbose_flag(parser)
    return parser


def memory_estimate(model_config, config, args) -> Estimate:
    """The peak memory of summarizing --batch-size articles at once (runtime/peak_memory.py):
    the float32 model, and a batch's cache of articles x beams rows as long as the longest
    prompt allowed (--max-input-tokens) and --max-new-tokens, rounded as the Generator rounds."""
    from generation.batch import round_up
    prompt_slots = round_up(args.max_input_tokens, args.length_multiple)
    cache_length = round_up(prompt_slots + config.max_new_tokens, args.length_multiple)

    def decoding(count: int) -> Decoding:
        return Decoding(count * config.num_beams, cache_length, prompt_slots, prefill_rows=count,
                        reorders=config.num_beams > 1)
    return generation_estimate("fine_tuning.abstractive_summarization.evaluate", model_config, "float32", decoding,
                               args.batch_size, args.generation_compile, format_flag=None, slots_flag="--batch-size")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from checkpoint_utils.load import CheckpointMismatchError
    from checkpoint_utils.tf_checkpoint import resolve_checkpoint
    from config.params import ParamsError
    from generation.loading import load_generation_model
    from serving.loading import serving_params
    from generation.config import GenerationConfigError
    from input.tokenizer import load_tokenizer
    from runtime.logging_utils import log
    try:
        params = serving_params(args.params, args.hf_checkpoint)
        model_config = params.model
        tokenizer = load_tokenizer(args.tokenizer)
        tokenizer.check_fits_model(model_config.vocab_size)
        config = mlperf_generation_config(tokenizer.eos_id, 1 if args.greedy else args.num_beams,
                                          args.min_new_tokens, args.max_new_tokens)
        room = model_config.max_position_embeddings - args.max_new_tokens
        if args.max_input_tokens > room:
            raise InputDataError(f"--max-input-tokens {args.max_input_tokens} + --max-new-tokens {args.max_new_tokens} "
                                 f"exceed model.max_position_embeddings={model_config.max_position_embeddings}; "
                                 f"use --max-input-tokens {room} or fewer new tokens")
        if args.batch_size < 1 or (args.limit is not None and args.limit < 1):
            raise InputDataError("--batch-size and --limit must be positive")
        preflight.check(memory_estimate(model_config, config, args), args.skip_memory_check)
        sep_id = None
        if not args.raw_prompt:
            sep_id = default_sep_id(tokenizer) if args.sep_id is None else args.sep_id
            check_sep_id(sep_id, tokenizer, model_config.vocab_size)
        paths = expand_article_inputs(args.input)
        checkpoint = args.hf_checkpoint or resolve_checkpoint(args.model_dir or args.checkpoint_path)
        articles = load_eval_articles(paths, tokenizer, file_format=args.format, prompt=args.prompt, sep_id=sep_id,
                                      max_input_tokens=args.max_input_tokens, limit=args.limit)
        settings = {"inputs": [[p, os.path.getsize(p)] for p in paths], "checkpoint": os.path.abspath(checkpoint),
                    "tokenizer": tokenizer.fingerprint, "prompt": args.prompt, "sep_id": sep_id,
                    "max_input_tokens": args.max_input_tokens, "num_beams": config.num_beams,
                    "min_new_tokens": config.min_new_tokens, "max_new_tokens": config.max_new_tokens,
                    "early_stopping": config.early_stopping}
        if args.weight_format != "float32":      # (absent for float32: earlier runs' settings stay valid)
            settings["weight_format"] = args.weight_format
        model = load_generation_model(model_config, checkpoint, args.weight_format)
        log(f"{len(articles)} articles from {', '.join(paths)}; checkpoint {checkpoint}")
        result = evaluate(model, tokenizer, articles, config, args.output_dir, batch_size=args.batch_size,
                          settings=settings, overwrite=args.overwrite, progress=not args.no_progress,
                          compile_mode=args.generation_compile, length_multiple=args.length_multiple)
    except (InputDataError, ParamsError, GenerationConfigError, CheckpointMismatchError, FileNotFoundError,
            ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
