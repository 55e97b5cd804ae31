"""Benchmark: summarization evaluation throughput, `evaluate` vs transformers' `generate`.

    python -m bench.summarize [--hidden 256] [--layers 4] [--vocab 50400] [--articles 16]
                              [--article-tokens 256,512] [--batch 4] [--beams 4]
                              [--min-new 30] [--max-new 64] [--repeats 2]

One random GPT-J is built with transformers, saved, converted with checkpoint_utils and
loaded into GPTJModel, so both sides run the same weights. The articles are random token
sequences framed as evaluate frames them (`[eos] + article + [sep]`). Both sides decode them
in the same batches with MLPerf's beam settings (num_beams, early_stopping=True, min/max new
tokens, eos stops and pads, batches left-padded):

  ours          fine_tuning.abstractive_summarization.evaluate.evaluate: the whole job,
                batches, predictions.jsonl writes and ROUGE included (its first run, which
                compiles, is not timed)
  transformers  generate() per batch with the same settings, then the same ROUGE scoring

Reported: articles/s and new tokens/s (generated tokens / seconds) per side, the ratio, and
how many articles got the same token ids from both. Repeats alternate the sides (a noisy
neighbour hurts both); the best repeat of each is kept.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

from bench.shapes import add_shape_flags
from config.cli import ArgumentParser
from config.quiet import add_verbose_flag, quiet_tensorflow

if __name__ == "__main__":      # before the imports below load TensorFlow (--verbose shows its start-up lines)
    quiet_tensorflow("--verbose" in sys.argv[1:])
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

EOS, SEP = 0, 1      # random ids in a random model: eos stops and pads, sep frames the article


def decoding_tokenizer(work: str):
    """A small byte-level BPE for turning ids into text (ids past it are dropped, as for GPT-J's padding rows)."""
    import glob
    import sysconfig

    from input.scripts.train_tokenizer import train_tokenizer
    sources = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))[:40]
    texts = [open(p, encoding="utf-8", errors="replace").read() for p in sources]
    return train_tokenizer(texts, os.path.join(work, "tokenizer"), vocab_size=512)


def run_transformers(hf_model, tokenizer, articles, batch: int, args) -> tuple[float, list[list[int]]]:
    """Seconds and new ids per article for generate() over the batches, ROUGE included."""
    import numpy as np
    import torch

    from fine_tuning.abstractive_summarization.rouge import score_summaries
    outputs = []
    start = time.perf_counter()
    for first in range(0, len(articles), batch):
        prompts = [a.prompt_ids for a in articles[first:first + batch]]
        slots = max(len(p) for p in prompts)
        ids = np.full([len(prompts), slots], EOS, np.int64)
        mask = np.zeros_like(ids)
        for row, prompt in enumerate(prompts):
            ids[row, slots - len(prompt):], mask[row, slots - len(prompt):] = prompt, 1
        with torch.no_grad():
            out = hf_model.generate(torch.tensor(ids), attention_mask=torch.tensor(mask), num_beams=args.beams,
                                    early_stopping=True, min_new_tokens=args.min_new, max_new_tokens=args.max_new,
                                    do_sample=False, eos_token_id=EOS, pad_token_id=EOS)
        for row in out[:, slots:].tolist():
            outputs.append(row[:row.index(EOS)] if EOS in row else row)
    score_summaries([tokenizer.decode(o, skip_unknown=True) or "." for o in outputs],
                    [a.reference for a in articles])
    return time.perf_counter() - start, outputs


def run_ours(generator, tokenizer, articles, config, batch: int, output_dir: str) -> tuple[float, list[list[int]]]:
    """Seconds and new ids per article (from predictions.jsonl) for the whole evaluate job; the
    generator keeps its compiled decoders across runs, as one long evaluate run does."""
    import json

    from fine_tuning.abstractive_summarization.evaluate import evaluate
    start = time.perf_counter()
    evaluate(generator.model, tokenizer, articles, config, output_dir, batch_size=batch, overwrite=True,
             progress=False, generator=generator)
    seconds = time.perf_counter() - start
    with open(os.path.join(output_dir, "predictions.jsonl"), encoding="utf-8") as f:
        records = sorted((json.loads(line) for line in f), key=lambda r: r["index"])
    return seconds, [r["generated_ids"] for r in records]


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    add_shape_flags(parser, hidden=256, layers=4)
    parser.add_argument("--articles", type=int, default=16, help="articles summarized per run")
    parser.add_argument("--article-tokens", default="256,512", help="min,max random article length")
    parser.add_argument("--batch", type=int, default=4, help="articles per batch")
    parser.add_argument("--beams", type=int, default=4, help="beam search width")
    parser.add_argument("--min-new", dest="min_new", type=int, default=30, help="minimum new tokens")
    parser.add_argument("--max-new", dest="max_new", type=int, default=64, help="maximum new tokens")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs of each side (best is reported)")
    parser.add_argument("--compile", default="xla", choices=("xla", "graph"), help="how our decode step runs")
    add_verbose_flag(parser)
    args = parser.parse_args(argv)

    import numpy as np
    import torch

    from bench.generate import build_models
    from bench.machine import describe_machine
    from fine_tuning.abstractive_summarization.evaluate import EvalArticle, mlperf_generation_config
    from fine_tuning.abstractive_summarization.layout import generation_prompt
    from generation.generator import Generator

    print(describe_machine())
    work = tempfile.mkdtemp(prefix="bench-summarize-")
    try:
        hf_model, model = build_models(args, work)
        tokenizer = decoding_tokenizer(work)
        low, high = (int(v) for v in args.article_tokens.split(","))
        rng = np.random.default_rng(0)
        articles = []
        for index in range(args.articles):
            body = rng.integers(2, args.vocab, size=int(rng.integers(low, high + 1))).tolist()
            prompt, cut = generation_prompt(body, eos_id=EOS, sep_id=SEP, max_input_tokens=2048 - args.max_new)
            articles.append(EvalArticle(index, str(index), "a reference summary.", prompt, cut))
        config = mlperf_generation_config(EOS, args.beams, args.min_new, args.max_new)

        out_dir = os.path.join(work, "eval")
        started = time.perf_counter()
        generator = Generator(model, compile_mode=args.compile)
        run_ours(generator, tokenizer, articles, config, args.batch, out_dir)      # compiles every shape
        compile_seconds = time.perf_counter() - started
        run_transformers(hf_model, tokenizer, articles[:1], 1, argparse.Namespace(**{**vars(args), "max_new": 2,
                                                                                   "min_new": 0}))
        ours, theirs = [], []
        for _ in range(args.repeats):
            ours.append(run_ours(generator, tokenizer, articles, config, args.batch, out_dir))
            theirs.append(run_transformers(hf_model, tokenizer, articles, args.batch, args))
    finally:
        shutil.rmtree(work, ignore_errors=True)

    best, best_hf = min(s for s, _ in ours), min(s for s, _ in theirs)
    tokens = sum(len(ids) for ids in ours[0][1])
    tokens_hf = sum(len(ids) for ids in theirs[0][1])
    same = sum(a == b for a, b in zip(ours[0][1], theirs[0][1]))
    print(f"GPT-J d={args.hidden} layers={args.layers} vocab={args.vocab}; {args.articles} articles of "
          f"{low}-{high} tokens, batch {args.batch}, {args.beams} beams, early stopping, {args.min_new}-{args.max_new} "
          f"new tokens; torch threads {torch.get_num_threads()}; ours: {args.compile} (compile + first run "
          f"{compile_seconds:.1f}s)")
    print(f"{'side':>13} | {'seconds':>8} | {'articles/s':>10} | {'new tokens/s':>12}")
    print(f"{'ours':>13} | {best:8.2f} | {args.articles / best:10.3f} | {tokens / best:12.1f}")
    print(f"{'transformers':>13} | {best_hf:8.2f} | {args.articles / best_hf:10.3f} | {tokens_hf / best_hf:12.1f}")
    print(f"ratio (articles/s ours / transformers): {best_hf / best:.2f}x; same token ids: {same}/{args.articles} "
          f"articles; seconds per repeat: ours {', '.join(f'{s:.2f}' for s, _ in ours)}; "
          f"transformers {', '.join(f'{s:.2f}' for s, _ in theirs)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
