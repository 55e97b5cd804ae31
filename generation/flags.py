"""The predict-mode flags of run.py and their mapping to a GenerationConfig.

Kept free of TensorFlow imports so `run.py --help` stays fast. Decoding flags use
transformers' names; docs/generation.md describes each.
"""
from __future__ import annotations

import argparse

from generation.config import COMPILE_MODES, GenerationConfig, GenerationConfigError
from input.tokenizer import GptTokenizer


def add_predict_flags(group: argparse._ArgumentGroup) -> None:
    """The predict-mode flags of run.py (decoding flags use transformers' names)."""
    group.add_argument("--prompt", default=None, metavar="TEXT",
                       help="text to continue (streamed to the console)")
    group.add_argument("--prompts_file", default=None, metavar="PATH",
                       help="prompts, one per line; or JSONL with a 'prompt' field (and optionally 'seed')")
    group.add_argument("--tokenizer", default=None, metavar="SRC",
                       help="tokenizer directory, tokenizer.json or hub id")
    group.add_argument("--output", default=None, metavar="PATH",
                       help="JSONL to append results to (default: MODEL_DIR/predictions.jsonl)")
    group.add_argument("--max_new_tokens", type=int, default=32, metavar="N",
                       help="at most N new tokens per prompt")
    group.add_argument("--min_new_tokens", type=int, default=0, metavar="N",
                       help="stop tokens are suppressed before this many new tokens")
    group.add_argument("--do_sample", action="store_true",
                       help="sample instead of greedy decoding (with --num_beams > 1: beam sampling)")
    group.add_argument("--temperature", type=float, default=1.0, metavar="T", help="sampling temperature (> 0)")
    group.add_argument("--top_k", type=int, default=0, metavar="K",
                       help="sample from the k most likely tokens (0: off)")
    group.add_argument("--top_p", type=float, default=1.0, metavar="P",
                       help="nucleus sampling mass in (0, 1] (1: off)")
    group.add_argument("--repetition_penalty", type=float, default=1.0, metavar="R",
                       help="> 1 discourages repeats (1: off)")
    group.add_argument("--num_beams", type=int, default=1, metavar="K",
                       help="beam search with this many beams (1: off)")
    group.add_argument("--num_return_sequences", type=int, default=1, metavar="N",
                       help="completions per prompt: N samples (--do_sample) or the N best beams")
    group.add_argument("--length_penalty", type=float, default=1.0, metavar="A",
                       help="beam score = log-probability / new_tokens ** length_penalty")
    group.add_argument("--early_stopping", choices=("false", "true", "never"), default="false",
                       help="beam search stopping rule, as in transformers")
    group.add_argument("--stop", action="append", default=[], metavar="TEXT",
                       help="stop when the completion contains TEXT (repeatable; not with beam search)")
    group.add_argument("--stop_token_id", type=int, action="append", default=[], metavar="ID",
                       help="extra stop token id (repeatable); the tokenizer's EOS always stops unless "
                            "--ignore_eos")
    group.add_argument("--ignore_eos", action="store_true", help="do not stop at the tokenizer's EOS token")
    group.add_argument("--bad_words", action="append", default=[], metavar="TEXT",
                       help="never generate the tokens of TEXT in a row (repeatable)")
    group.add_argument("--seed", type=int, default=0, metavar="S",
                       help="sampling seed (a JSONL 'seed' field overrides)")
    group.add_argument("--batch_size", type=int, default=8, metavar="N", help="prompts decoded together")
    group.add_argument("--generation_compile", choices=COMPILE_MODES, default="xla",
                       help="how the decode step runs: XLA (fastest), graph, or eager")


def config_from_flags(args: argparse.Namespace, tokenizer: GptTokenizer) -> GenerationConfig:
    """Decoding flags -> a validated GenerationConfig (stop at EOS unless --ignore_eos)."""
    stop_ids = ([] if args.ignore_eos else [tokenizer.eos_id]) + list(args.stop_token_id)
    bad_words = []
    for text in args.bad_words:
        ids = tokenizer.encode(text)
        if not ids:
            raise GenerationConfigError(f"--bad_words {text!r} has no tokens; give non-empty text")
        bad_words.append(tuple(ids))
    if args.batch_size < 1:
        raise GenerationConfigError(f"--batch_size={args.batch_size} must be >= 1")
    early = {"false": False, "true": True, "never": "never"}[args.early_stopping]
    return GenerationConfig(
        max_new_tokens=args.max_new_tokens, min_new_tokens=args.min_new_tokens, do_sample=args.do_sample,
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        repetition_penalty=args.repetition_penalty, num_beams=args.num_beams,
        num_return_sequences=args.num_return_sequences,
        length_penalty=args.length_penalty, early_stopping=early, stop_token_ids=tuple(dict.fromkeys(stop_ids)),
        stop_strings=tuple(args.stop), bad_words_ids=tuple(bad_words), seed=args.seed,
        pad_token_id=tokenizer.eos_id)
