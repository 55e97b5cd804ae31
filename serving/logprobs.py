"""Token log-probabilities for the completions API: a scoring pass and OpenAI's legacy shape.

    scored = Scorer(model).score(prompt_ids + generated_ids, top=n)
    choice["logprobs"] = completion_logprobs(tokenizer, ids, scored, first=len(prompt_ids) or 0 (echo), top=n)

The scoring pass runs the whole sequence through the model once (teacher forcing, as a
prefill does) after generation has finished, outside the slot batch's compiled decode call:
the decode step stays as lean as it was, and every request (greedy, sampled, beam search)
gets the same kind of numbers. They are the model's own distribution, log_softmax of its
float32 logits, before temperature, top-k/top-p or repetition penalty (vLLM does the same).
"""
from __future__ import annotations

import codecs
from typing import NamedTuple, Sequence

import numpy as np
import tensorflow as tf

from input.tokenizer import GptTokenizer
from model import GPTJModel


class ScoredTokens(NamedTuple):
    """Per position t >= 1 of a sequence: how the model scored token t given tokens < t."""
    token_logprobs: np.ndarray     # [T - 1] float32: log p(ids[t] | ids[:t]), t = 1..T-1
    top_ids: np.ndarray            # [T - 1, k] int32: the k likeliest ids at each position, best first
    top_logprobs: np.ndarray       # [T - 1, k] float32: their log-probabilities


def score_tokens(model: GPTJModel, ids: tf.Tensor, top: int) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """ids [b, T] int32 -> (log p of ids[:, 1:] [b, T-1], top ids [b, T-1, top], their log p [b, T-1, top]).
    One forward over ids[:, :-1]; causal attention makes position t see ids[:, :t + 1] only."""
    logits = model(ids[:, :-1]).logits                                     # [b, T-1, V] float32
    logprobs = tf.nn.log_softmax(logits, axis=-1)                          # [b, T-1, V]
    chosen = tf.gather(logprobs, ids[:, 1:], axis=-1, batch_dims=2)        # [b, T-1]
    top_logprobs, top_ids = tf.math.top_k(logprobs, k=top)                 # [b, T-1, top] each
    return chosen, top_ids, top_logprobs


class Scorer:
    """Scores one sequence at a time, eagerly. Eager, not a compiled function: sequences come
    in every length (prompt + completion), and compiling per length would put a compilation
    (seconds; ~40 s for GPT-J 6B under XLA) in a request's path and keep one program per length
    (~300 MB each for 6B), while a whole-sequence forward is matmuls on [T, D] whose per-op
    dispatch costs little beside them."""

    def __init__(self, model: GPTJModel):
        self.model = model

    def score(self, ids: Sequence[int], top: int) -> ScoredTokens:
        """ids: prompt and completion tokens, within the model's positions."""
        if len(ids) < 2:                        # one token: nothing to score
            return ScoredTokens(np.zeros([0], np.float32), np.zeros([0, top], np.int32), np.zeros([0, top], np.float32))
        tokens = tf.constant([list(ids)], tf.int32)                                   # [1, T]
        chosen, top_ids, top_logprobs = score_tokens(self.model, tokens, top)
        return ScoredTokens(chosen.numpy()[0], top_ids.numpy()[0], top_logprobs.numpy()[0])


def token_string(tokenizer: GptTokenizer, token_id: int) -> str:
    """OpenAI's name for a token: its text; "bytes:\\xNN..." for a piece of a UTF-8 character
    (so different tokens never share a name); `<|token N|>` for an id past the tokenizer's vocab
    (GPT-J's padding rows), which has no text."""
    raw = tokenizer.token_bytes(token_id)
    if raw is None:
        return f"<|token {token_id}|>"
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


def text_offsets(tokenizer: GptTokenizer, ids: Sequence[int]) -> list[int]:
    """Character offset where each token's text starts in the decoded text of `ids` (a token that
    completes a split UTF-8 character starts where the character's first piece did not show)."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    offsets, length = [], 0
    for token_id in ids:
        offsets.append(length)
        raw = tokenizer.token_bytes(token_id)
        length += len(decoder.decode(raw)) if raw is not None else 0
    return offsets


def completion_logprobs(tokenizer: GptTokenizer, ids: Sequence[int], scored: ScoredTokens, first: int,
                        top: int) -> dict:
    """OpenAI's `choices[i].logprobs` for tokens ids[first:] of a scored sequence (first = 0 with
    echo, else the prompt's length): tokens, token_logprobs, top_logprobs (the `top` likeliest
    tokens, and the token itself if it is not among them: up to top + 1 entries) and text_offset
    (where each token's text starts, counted from the start of the prompt's text, as OpenAI
    does). Token 0 has no logprob (nothing precedes it): null, as OpenAI gives with echo."""
    names = [token_string(tokenizer, i) for i in ids[first:]]
    token_logprobs, top_logprobs = [], []
    for t, name in zip(range(first, len(ids)), names):
        if t == 0:
            token_logprobs.append(None)
            top_logprobs.append(None)
            continue
        chosen = float(scored.token_logprobs[t - 1])
        best = {token_string(tokenizer, int(i)): float(v)
                for i, v in zip(scored.top_ids[t - 1, :top], scored.top_logprobs[t - 1, :top])}
        best.setdefault(name, chosen)
        token_logprobs.append(chosen)
        top_logprobs.append(best)
    return {"tokens": names, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs,
            "text_offset": text_offsets(tokenizer, ids)[first:]}
