"""Left-padded prompt batches and the key/value cache layout they imply.

Prompts of different lengths share one cache of static length L. Row r's prompt of n_r
tokens is right-aligned at slots [P - n_r, P) (P = the padded prompt length), so every row
writes its k-th new token at the same slot P + k and one compiled step serves the batch.

Slots are storage; rotary positions are separate: a token's position is its slot minus the
row's first real slot, i.e. 0 for the first real token, whatever the padding. That is what
transformers' `generate` derives from the attention mask (cumulative sum - 1, and the last
position + 1 for each new token), so left-padded batches match it token for token.
Padding slots are never attended to; their positions are clamped to 0.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import tensorflow as tf

from generation.config import COMPILE_MODES, round_up  # noqa: F401 (round_up: its callers' import path)
from model import GPTJModel


@dataclass(frozen=True)
class PromptBatch:
    tokens: np.ndarray        # [b, P] int32, left padded with the pad id
    first_slot: np.ndarray    # [b] int32: slot of each row's first real token (its padding count)

    @property
    def prompt_slots(self) -> int:
        return self.tokens.shape[1]


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, multiple: int = 1) -> PromptBatch:
    """Right-align prompts in a [b, P] array, P = the longest prompt rounded up to `multiple`
    (a few shapes, hence few compilations, across batches of varied lengths)."""
    slots = round_up(max(len(p) for p in prompts), multiple)
    tokens = np.full([len(prompts), slots], pad_id, np.int32)
    first_slot = np.zeros([len(prompts)], np.int32)
    for row, prompt in enumerate(prompts):
        first_slot[row] = slots - len(prompt)
        tokens[row, first_slot[row]:] = prompt
    return PromptBatch(tokens, first_slot)


def key_valid(first_slot: tf.Tensor, end: tf.Tensor, cache_length: int) -> tf.Tensor:
    """[b, L] bool: slots holding a real token once slots < end are written."""
    slots = tf.range(cache_length)[None, :]                                            # [1, L]
    return tf.logical_and(slots >= first_slot[:, None], slots < end)


def slot_positions(first_slot: tf.Tensor, start: tf.Tensor, length: int) -> tf.Tensor:
    """[b, s] int32 rotary positions of the tokens at slots [start, start + s)."""
    slots = tf.cast(start, tf.int32) + tf.range(length)                                 # [s]
    return tf.maximum(slots[None, :] - first_slot[:, None], 0)


def forward_slots(model: GPTJModel, input_ids: tf.Tensor, first_slot: tf.Tensor, start: tf.Tensor,
                  cache: tuple) -> tuple[tf.Tensor, tuple]:
    """Run input_ids [b, s] written at slots [start, start + s) -> (logits of the last one [b, V]
    float32, updated cache). Each token attends to the real tokens at or before its slot."""
    length = input_ids.shape[1]
    cache_length = cache[0][0].shape[2]
    out = model(input_ids, position_ids=slot_positions(first_slot, start, length),
                attention_mask=tf.cast(key_valid(first_slot, start + length, cache_length), tf.int32),
                cache=cache, cache_index=start, last_only=True)
    return out.logits[:, -1], out.cache



def compiled(function: Callable, mode: str) -> Callable:
    """`function` as an XLA-compiled tf.function ("xla", the fast default), a plain graph
    ("graph"), or as is ("eager": no tracing, for debugging and for tiny test models where
    tracing costs more than running)."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile mode {mode!r} is not one of {', '.join(COMPILE_MODES)}")
    if mode == "eager":
        return function
    return tf.function(function, jit_compile=mode == "xla")
