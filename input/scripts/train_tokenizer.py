"""Train a GPT-2 style byte-level BPE on local text, for tests and the offline demo.

    python -m input.scripts.train_tokenizer --input corpus/ --output-dir tok --vocab-size 512

The GPT-2 files cannot be downloaded on every machine, so this makes a tokenizer of the
same kind and file format: byte-level pre-tokenization without a prefix space, BPE merges,
`<|endoftext|>` as the only special token, saved as `vocab.json` + `merges.txt` (what GPT-2
ships) and `tokenizer.json`. It reads the same inputs as preprocessing (jsonl.zst, jsonl,
txt). Training is deterministic for the same text and vocab size.
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys
from typing import Iterable, Sequence

from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from input.errors import InputDataError
from input.readers import expand_inputs, read_documents
from input.tokenizer import EOS_TOKEN, GptTokenizer, gpt2_tokenizer_from_files
from config.quiet import add_verbose_flag, quiet_tensorflow
from config.cli import ArgumentParser

__all__ = ["train_tokenizer", "main"]

_BYTE_ALPHABET = 256


def train_tokenizer(texts: Iterable[str], output_dir: str, *, vocab_size: int = 512,
                    min_frequency: int = 2) -> GptTokenizer:
    """Train on `texts`, save vocab.json/merges.txt/tokenizer.json in `output_dir`, return it loaded."""
    if vocab_size < _BYTE_ALPHABET + 1:
        raise ValueError(f"vocab_size={vocab_size} must be at least {_BYTE_ALPHABET + 1}: 256 byte "
                         "tokens plus <|endoftext|>")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, show_progress=False,
                                  special_tokens=[EOS_TOKEN],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer=trainer)
    os.makedirs(output_dir, exist_ok=True)
    vocab_path, merges_path = tokenizer.model.save(output_dir)
    # Rebuild from the saved files so tokenizer.json and vocab/merges load to the same thing.
    rebuilt = gpt2_tokenizer_from_files(vocab_path, merges_path)
    rebuilt.save(os.path.join(output_dir, "tokenizer.json"))
    return GptTokenizer(rebuilt, source=output_dir)


def main(argv: Sequence[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m input.scripts.train_tokenizer", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--input", nargs="+", required=True, help="jsonl.zst / jsonl / txt files, dirs or globs")
    parser.add_argument("--output-dir", required=True, help="where vocab.json, merges.txt and tokenizer.json go")
    parser.add_argument("--vocab-size", type=int, default=512, help="tokens including 256 bytes and EOS")
    parser.add_argument("--min-frequency", type=int, default=2, help="fewest occurrences of a merged pair")
    parser.add_argument("--max-documents", type=int, default=None, help="train on the first N documents only")
    add_verbose_flag(parser)
    args = parser.parse_args(argv)
    quiet_tensorflow(args.verbose)
    try:
        texts = (d.text for d in read_documents(expand_inputs(args.input)))
        if args.max_documents is not None:
            texts = itertools.islice(texts, args.max_documents)
        tokenizer = train_tokenizer(texts, args.output_dir, vocab_size=args.vocab_size,
                                    min_frequency=args.min_frequency)
    except (InputDataError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {args.output_dir}: {tokenizer.vocab_size} tokens, EOS id {tokenizer.eos_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
