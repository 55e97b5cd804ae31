"""The summarization record layout, the separator id, and the prompt text: one definition
shared by `prepare` (training records) and `evaluate` (generation prompts).

For an article of tokens A and a summary of tokens B (S = max_sequence_length):

    input_ids  = [eos] + A + [sep] + B            then eos padding to S
    labels     = A + [eos] + B + [eos]            then eos padding (the next token at every position)
    input_mask = 0 on the |A| + 1 positions up to the last article token, 1 on the 1 + |B|
                 positions whose input is sep or a summary token (they predict B and the
                 closing eos), 0 on padding

So the loss counts exactly the summary and its end; the model reads the article and learns
to write after `sep`. `evaluate` prompts with `[eos] + A + [sep]` and stops at eos.

The layout runs batched through TensorFlow Text: a `WaterfallTrimmer` over the segments
[B, A] gives the summary its whole length first and cuts the article to what remains (the
`--truncate-article` rule), `combine_segments([A, B], eos, sep)` builds
`[eos] A [sep] B [sep]` with segment ids, from which input_ids (all but the last),
labels (all but the first, sep written as eos) and the mask (segment ids of the labels)
follow; `pad_model_inputs` pads to S.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from input.errors import InputDataError
from input.tokenizer import GptTokenizer

__all__ = ["MLPERF_INSTRUCTION", "MLPERF_TEMPLATE", "MLPERF_MAX_INPUT_TOKENS", "PROMPTS", "FRAME_TOKENS",
           "SkipReason", "prompt_text", "default_sep_id", "check_sep_id", "unreachable_byte_token_ids",
           "article_budget", "skip_reason", "LaidOut", "lay_out_batch", "generation_prompt"]

# MLPerf Inference GPT-J: the Alpaca "prompt_input" template around the article, and the cap
# on the tokenized input (right side cut: a long article loses its end).
MLPERF_INSTRUCTION = "Summarize the following news article:"
MLPERF_TEMPLATE = ("Below is an instruction that describes a task, paired with an input that provides further "
                   "context. Write a response that appropriately completes the request.\n\n"
                   "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:")
MLPERF_MAX_INPUT_TOKENS = 1919
PROMPTS = ("none", "mlperf")
FRAME_TOKENS = 2          # the leading eos and the sep around the article


class SkipReason:
    EMPTY_ARTICLE = "empty_article"
    EMPTY_SUMMARY = "empty_summary"
    TOO_LONG = "too_long"                    # does not fit and --truncate-article is off
    SUMMARY_TOO_LONG = "summary_too_long"    # would not fit even with a one-token article
    ALL = (EMPTY_ARTICLE, EMPTY_SUMMARY, TOO_LONG, SUMMARY_TOO_LONG)


def prompt_text(article: str, prompt: str, instruction: str | None = None) -> str:
    """The text the model reads for `article`: as is ("none") or in MLPerf's template."""
    if prompt == "none":
        return article
    if prompt == "mlperf":
        return MLPERF_TEMPLATE.format(instruction=instruction or MLPERF_INSTRUCTION, input=article)
    raise ValueError(f"prompt {prompt!r} is not one of {', '.join(PROMPTS)}")


# ---------------------------------------------------------------------------- separator

def _byte_level_chars() -> dict[int, str]:
    """GPT-2's byte -> printable character map of byte-level BPE (printable Latin-1 bytes map
    to themselves, the rest to 256 + n in byte order)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    chars, extra = {}, 0
    for byte in range(256):
        if byte in keep:
            chars[byte] = chr(byte)
        else:
            chars[byte] = chr(256 + extra)
            extra += 1
    return chars


# Bytes that never occur in UTF-8: Python text, hence every tokenized string, never holds them.
_NEVER_IN_UTF8 = (0xC0, 0xC1) + tuple(range(0xF5, 0x100))


def unreachable_byte_token_ids(tokenizer: GptTokenizer) -> list[int]:
    """Ids of the single-byte tokens no text can produce (bytes that never occur in UTF-8),
    sorted: free slots inside a tokenizer that fills the model's vocabulary."""
    chars = _byte_level_chars()
    ids = (tokenizer.token_to_id(chars[b]) for b in _NEVER_IN_UTF8)
    return sorted(i for i in ids if i is not None)


def default_sep_id(tokenizer: GptTokenizer) -> int:
    """The first id after the tokenizer's BPE vocabulary: 50257 for GPT-2/GPT-J files (GPT-J's
    model has 50400 rows, so slots 50257..50399 are free)."""
    return tokenizer.base_vocab_size


def check_sep_id(sep_id: int, tokenizer: GptTokenizer, model_vocab_size: int, flag: str = "--sep-id") -> None:
    """Refuse a separator the model cannot embed or that text can produce."""
    free = unreachable_byte_token_ids(tokenizer)
    hint = ""
    if tokenizer.base_vocab_size < model_vocab_size:
        hint = f"; pass {flag} {tokenizer.base_vocab_size} (the first slot after the tokenizer's vocabulary)"
    elif free:
        hint = (f"; the tokenizer fills the model's {model_vocab_size} rows, so pass {flag} {free[0]} (a byte "
                f"token that UTF-8 text never contains) or grow model.vocab_size")
    if not 0 <= sep_id < model_vocab_size:
        raise InputDataError(f"{flag} {sep_id} is outside the model's vocabulary (model vocab size "
                             f"{model_vocab_size}){hint}")
    if sep_id == tokenizer.eos_id:
        raise InputDataError(f"{flag} {sep_id} is the eos id, which ends the summary; it must be its own "
                             f"token{hint}")
    if sep_id < tokenizer.base_vocab_size and sep_id not in free:
        token = tokenizer.id_to_token(sep_id)
        raise InputDataError(f"{flag} {sep_id} collides with the tokenizer's token {token!r}, which text can "
                             f"produce{hint}")


# ---------------------------------------------------------------------------- rules

def article_budget(seq_len: int, summary_tokens: int) -> int:
    """How many article tokens fit beside a summary: S - |B| - 2 (the frame tokens)."""
    return seq_len - summary_tokens - FRAME_TOKENS


def skip_reason(article_tokens: int, summary_tokens: int, seq_len: int, truncate_article: bool) -> str | None:
    """Why an example is not written, or None when it is (maybe with its article cut)."""
    if article_tokens == 0:
        return SkipReason.EMPTY_ARTICLE
    if summary_tokens == 0:
        return SkipReason.EMPTY_SUMMARY
    budget = article_budget(seq_len, summary_tokens)
    if article_tokens <= budget:
        return None
    if not truncate_article:
        return SkipReason.TOO_LONG
    return SkipReason.SUMMARY_TOO_LONG if budget < 1 else None


@dataclass(frozen=True)
class LaidOut:
    input_ids: np.ndarray     # [n, S] int64
    labels: np.ndarray        # [n, S] int64
    input_mask: np.ndarray    # [n, S] int64
    article_kept: np.ndarray  # [n] int64: article tokens left after trimming


def lay_out_batch(articles: Sequence[Sequence[int]], summaries: Sequence[Sequence[int]], *, seq_len: int,
                  eos_id: int, sep_id: int) -> LaidOut:
    """The records of n examples that `skip_reason` keeps (articles longer than their budget
    are cut from the end), through TensorFlow Text."""
    import tensorflow as tf
    import tensorflow_text as tf_text

    article = tf.ragged.constant([list(a) for a in articles], dtype=tf.int64, ragged_rank=1)   # [n, (|A|)]
    summary = tf.ragged.constant([list(s) for s in summaries], dtype=tf.int64, ragged_rank=1)  # [n, (|B|)]
    # Waterfall over [B, A]: the summary takes its full length, the article what remains.
    summary, article = tf_text.WaterfallTrimmer(seq_len - FRAME_TOKENS).trim([summary, article])
    combined, segment_ids = tf_text.combine_segments([article, summary], start_of_sequence_id=eos_id,
                                                     end_of_segment_id=sep_id)               # [n, (|A|+|B|+3)]
    input_ids = combined[:, :-1]                                                             # [n, (L)]
    labels = tf.ragged.map_flat_values(lambda t: tf.where(t == sep_id, tf.constant(eos_id, tf.int64), t),
                                       combined[:, 1:])                                      # [n, (L)]
    mask = segment_ids[:, 1:]                                                                # [n, (L)]
    input_ids, _ = tf_text.pad_model_inputs(input_ids, seq_len, pad_value=eos_id)            # [n, S]
    labels, _ = tf_text.pad_model_inputs(labels, seq_len, pad_value=eos_id)                  # [n, S]
    mask, _ = tf_text.pad_model_inputs(mask, seq_len, pad_value=0)                           # [n, S]
    return LaidOut(input_ids.numpy().astype(np.int64), labels.numpy().astype(np.int64),
                   mask.numpy().astype(np.int64), article.row_lengths().numpy().astype(np.int64))


def generation_prompt(article_ids: Sequence[int], *, eos_id: int, sep_id: int | None, max_input_tokens: int
                      ) -> tuple[list[int], int]:
    """(prompt ids, article tokens cut) for generation: `[eos] + A + [sep]` as the records
    frame it (`sep_id=None`: the article ids alone, as MLPerf feeds its reference model),
    the whole prompt capped at `max_input_tokens` by cutting the article's end."""
    frame = FRAME_TOKENS if sep_id is not None else 0
    keep = max(max_input_tokens - frame, 0)
    body = list(article_ids[:keep])
    cut = len(article_ids) - len(body)
    return ([eos_id] + body + [sep_id] if sep_id is not None else body), cut
