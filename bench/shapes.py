"""The random GPT-J shape flags the benches share (--hidden, --layers, --heads, --rotary-dim,
--vocab), each bench giving its own defaults."""
from __future__ import annotations

import argparse


def add_shape_flags(parser: argparse.ArgumentParser, hidden: int = 512, layers: int = 8, heads: int = 8,
                    rotary_dim: int = 16, vocab: int = 50400) -> None:
    parser.add_argument("--hidden", type=int, default=hidden, help="hidden size of the random model")
    parser.add_argument("--layers", type=int, default=layers, help="decoder blocks of the random model")
    parser.add_argument("--heads", type=int, default=heads, help="attention heads")
    parser.add_argument("--rotary-dim", type=int, default=rotary_dim, help="rotary dimensions per head")
    parser.add_argument("--vocab", type=int, default=vocab, help="vocabulary size (GPT-J: 50400)")
