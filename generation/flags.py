"""The predict-mode flags of run.py and their mapping to a GenerationConfig.

The decoding flags are derived from GenerationConfig's fields (name, type, default, help), so
a default lives in one place. Kept free of TensorFlow imports so `run.py --help` stays fast.
Decoding flags use transformers' names; docs/generation.md describes each.
"""
from __future__ import annotations

import argparse
import dataclasses
import typing

from generation.config import COMPILE_MODES, WEIGHT_FORMATS, GenerationConfig, GenerationConfigError
from input.tokenizer import GptTokenizer


def decoding_fields() -> list[dataclasses.Field]:
    """The GenerationConfig fields that are CLI flags (their metadata says how)."""
    return [f for f in dataclasses.fields(GenerationConfig) if "flag" in f.metadata]


def add_decoding_flags(group: argparse._ArgumentGroup) -> None:
    """One flag per decoding field of GenerationConfig, named, typed and defaulted by the field."""
    hints = typing.get_type_hints(GenerationConfig)
    for field in decoding_fields():
        spec = dict(field.metadata["flag"])
        option = "--" + field.name.replace("_", "-")
        choices = spec.pop("choices", None)
        if choices is not None:
            default = next(name for name, value in choices.items() if value == field.default)
            group.add_argument(option, choices=list(choices), default=default, help=spec["help"])
        elif hints[field.name] is bool:
            group.add_argument(option, action="store_true", help=spec["help"])
        else:
            group.add_argument(option, type=hints[field.name], default=field.default, metavar=spec["metavar"],
                               help=f"{spec['help']} (default {field.default})")


def add_predict_flags(group: argparse._ArgumentGroup) -> None:
    """The predict-mode flags of run.py: the prompts, the tokenizer, the output, and the decoding
    flags of GenerationConfig (transformers' names)."""
    group.add_argument("--prompt", default=None, metavar="TEXT",
                       help="text to continue (streamed to the console)")
    group.add_argument("--prompts-file", default=None, metavar="PATH",
                       help="prompts, one per line; or JSONL with a 'prompt' field (and optionally 'seed')")
    group.add_argument("--tokenizer", default=None, metavar="SRC",
                       help="tokenizer directory, tokenizer.json or hub id")
    group.add_argument("--output", default=None, metavar="PATH",
                       help="JSONL to append results to (default: MODEL_DIR/predictions.jsonl)")
    add_decoding_flags(group)
    group.add_argument("--stop", action="append", default=[], metavar="TEXT",
                       help="stop when the completion contains TEXT (repeatable; not with beam search)")
    group.add_argument("--stop-token-id", type=int, action="append", default=[], metavar="ID",
                       help="extra stop token id (repeatable); the tokenizer's EOS always stops unless "
                            "--ignore-eos")
    group.add_argument("--ignore-eos", action="store_true", help="do not stop at the tokenizer's EOS token")
    group.add_argument("--bad-words", action="append", default=[], metavar="TEXT",
                       help="never generate the tokens of TEXT in a row (repeatable)")
    group.add_argument("--batch-size", type=int, default=8, metavar="N", help="prompts decoded together")
    group.add_argument("--generation-compile", choices=COMPILE_MODES, default="xla",
                       help="how the decode step runs: XLA (fastest), graph, or eager")
    add_weight_format_flag(group)
    add_hf_checkpoint_flag(group)


def add_weight_format_flag(group) -> None:
    """--weight-format: the dense kernels' format while generating (generation/weights.py)."""
    group.add_argument("--weight-format", choices=WEIGHT_FORMATS, default="float32",
                       help="dense kernels while generating: float32 as trained, bfloat16, or int8 "
                            "(weight-only, one scale per output channel); 16 and 8 bits decode faster")


def add_weight_source_flags(parser, verb: str) -> None:
    """Where a serving command's weights come from: --params, --model-dir (its latest checkpoint is
    `verb`, e.g. "served"), --checkpoint-path or --hf-checkpoint (serving/loading.py)."""
    parser.add_argument("--params", default=None, help="params YAML the weights were trained with "
                                                       "(optional with --hf-checkpoint)")
    parser.add_argument("--model-dir", default=None, help=f"run directory: its latest checkpoint is {verb}")
    parser.add_argument("--checkpoint-path", default=None, help="a checkpoint prefix or converted model directory")
    add_hf_checkpoint_flag(parser)


def add_hf_checkpoint_flag(group) -> None:
    """--hf-checkpoint: generate from a Hugging Face directory without converting it (generation/loading.py)."""
    group.add_argument("--hf-checkpoint", default=None, metavar="DIR",
                       help="a Hugging Face GPT-J / GPT-NeoX directory (config.json and safetensors) to load "
                            "directly, without conversion; the model: params come from its config.json, so "
                            "--params is optional (it may set the compute dtype and its other sections)")


def config_from_flags(args: argparse.Namespace, tokenizer: GptTokenizer) -> GenerationConfig:
    """Decoding flags -> a validated GenerationConfig (stop at EOS unless --ignore-eos)."""
    stop_ids = ([] if args.ignore_eos else [tokenizer.eos_id]) + list(args.stop_token_id)
    bad_words = []
    for text in args.bad_words:
        ids = tokenizer.encode(text)
        if not ids:
            raise GenerationConfigError(f"--bad-words {text!r} has no tokens; give non-empty text")
        bad_words.append(tuple(ids))
    if args.batch_size < 1:
        raise GenerationConfigError(f"--batch-size={args.batch_size} must be >= 1")
    decoding = {}
    for field in decoding_fields():
        value = getattr(args, field.name)
        choices = field.metadata["flag"].get("choices")
        decoding[field.name] = choices[value] if choices is not None else value
    return GenerationConfig(**decoding, stop_token_ids=tuple(dict.fromkeys(stop_ids)),
                            stop_strings=tuple(args.stop), bad_words_ids=tuple(bad_words),
                            pad_token_id=tokenizer.eos_id)
