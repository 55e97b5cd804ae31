"""Logit processors: pure functions from next-token scores [b, V] to modified scores [b, V].

Each follows the meaning of the transformers processor of the same purpose (tests compare
them with it); `process_scores` applies them in transformers' order: repetition penalty,
bad words, min_new_tokens, then, when sampling, temperature, top-k, top-p. Removed tokens
get -inf, so they have probability 0 and never win an argmax.

History arguments describe what the model has seen so far in a left-padded row:
`history` [b, L] token ids by cache slot, `history_valid` [b, L] bool (True on real prompt
and generated tokens, False on padding and on slots not written yet).
"""
from __future__ import annotations

import numpy as np
import tensorflow as tf

from generation.config import GenerationConfig

NEG_INF = float("-inf")


def token_presence(history: tf.Tensor, history_valid: tf.Tensor, vocab_size: int) -> tf.Tensor:
    """[b, L] ids + [b, L] validity -> [b, V] bool: which tokens occur in each row's valid slots.

    A scatter of counts rather than a one-hot [b, L, V], which would not fit for long rows."""
    batch, length = tf.shape(history)[0], tf.shape(history)[1]
    rows = tf.broadcast_to(tf.range(batch)[:, None], [batch, length])                   # [b, L]
    ids = tf.clip_by_value(tf.cast(history, tf.int32), 0, vocab_size - 1)
    indices = tf.reshape(tf.stack([rows, ids], axis=-1), [-1, 2])                        # [b*L, 2]
    counts = tf.scatter_nd(indices, tf.reshape(tf.cast(history_valid, tf.int32), [-1]),
                           tf.stack([batch, vocab_size]))                                # [b, V]
    return counts > 0


def repetition_penalty(scores: tf.Tensor, history: tf.Tensor, history_valid: tf.Tensor,
                       penalty: float) -> tf.Tensor:
    """Scores of tokens already present move towards "less likely": a negative score is
    multiplied by `penalty`, a non-negative one divided by it (the CTRL rule transformers uses)."""
    present = token_presence(history, history_valid, scores.shape[-1])                  # [b, V]
    penalized = tf.where(scores < 0, scores * penalty, scores / penalty)
    return tf.where(present, penalized, scores)


def table_fits(bad_words_ids: tuple[tuple[int, ...], ...], words: int, prefix_length: int) -> bool:
    """Whether bad_words_table can lay these words out in a table of `words` words whose prefixes
    hold `prefix_length` tokens (each word's tokens before its last)."""
    return len(bad_words_ids) <= words and all(len(w) - 1 <= prefix_length for w in bad_words_ids)


def bad_words_table(bad_words_ids: tuple[tuple[int, ...], ...], words: int | None = None,
                    prefix_length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Tables for `banned_by_table`: prefixes [W, M] right-aligned and filled with -1 (matches
    anything) where a word's prefix is shorter than M; last tokens [W], -1 for a row past the
    words given (an empty word: bans nothing). W and M default to the words' count and longest
    prefix; fixed sizes (a serving row's caps) must hold them."""
    longest = max((len(w) - 1 for w in bad_words_ids), default=0)
    words = len(bad_words_ids) if words is None else words
    prefix_length = longest if prefix_length is None else prefix_length
    if not table_fits(bad_words_ids, words, prefix_length):
        raise ValueError(f"{len(bad_words_ids)} bad words of up to {longest + 1} tokens do not fit a table of "
                         f"{words} words of up to {prefix_length + 1} tokens")
    prefixes = np.full([words, prefix_length], -1, np.int32)
    last = np.full([words], -1, np.int32)
    for i, word in enumerate(bad_words_ids):
        if len(word) > 1:
            prefixes[i, prefix_length - (len(word) - 1):] = word[:-1]
        last[i] = word[-1]
    return prefixes, last


def banned_by_table(history: tf.Tensor, history_valid: tf.Tensor, next_slot: tf.Tensor, prefixes: tf.Tensor,
                    last_tokens: tf.Tensor, vocab_size: int) -> tf.Tensor:
    """[b, V] bool: the last token of every bad word whose other tokens are exactly the tokens
    just before `next_slot` ([] or [b]), from tables per row: prefixes [b, W, M] and last tokens
    [b, W] as bad_words_table lays them out (a one-token word is always banned; -1 last: none)."""
    batch, length = tf.shape(history)[0], tf.shape(history)[1]
    longest = prefixes.shape[-1]
    next_slot = tf.broadcast_to(tf.cast(next_slot, tf.int32), [batch])
    slots = next_slot[:, None] - longest + tf.range(longest)[None, :]                      # [b, M]
    in_range = tf.logical_and(slots >= 0, slots < length)
    clipped = tf.clip_by_value(slots, 0, length - 1)
    recent = tf.gather(history, clipped, axis=1, batch_dims=1)                             # [b, M]
    recent_valid = tf.logical_and(tf.gather(history_valid, clipped, axis=1, batch_dims=1), in_range)
    recent = tf.where(recent_valid, tf.cast(recent, tf.int32), -2)      # -2 never equals a prefix entry
    agrees = tf.logical_or(prefixes == -1, prefixes == recent[:, None, :])                 # [b, W, M]
    matched = tf.logical_and(tf.reduce_all(agrees, axis=-1), last_tokens >= 0)             # [b, W]
    words = tf.shape(last_tokens)[1]
    rows = tf.broadcast_to(tf.range(batch)[:, None], [batch, words])
    indices = tf.reshape(tf.stack([rows, tf.maximum(last_tokens, 0)], -1), [-1, 2])
    hits = tf.scatter_nd(indices, tf.reshape(tf.cast(matched, tf.int32), [-1]), tf.stack([batch, vocab_size]))
    return hits > 0


def banned_tokens(history: tf.Tensor, history_valid: tf.Tensor, next_slot: tf.Tensor,
                  bad_words_ids: tuple[tuple[int, ...], ...], vocab_size: int) -> tf.Tensor:
    """banned_by_table with one table for every row (a GenerationConfig's bad words)."""
    prefix_table, last_tokens = bad_words_table(bad_words_ids)
    batch = tf.shape(history)[0]
    words, longest = prefix_table.shape
    prefixes = tf.broadcast_to(tf.constant(prefix_table)[None], tf.stack([batch, words, longest]))  # [b, W, M]
    last = tf.broadcast_to(tf.constant(last_tokens)[None], tf.stack([batch, words]))               # [b, W]
    return banned_by_table(history, history_valid, next_slot, prefixes, last, vocab_size)


def suppress(scores: tf.Tensor, mask: tf.Tensor) -> tf.Tensor:
    """-inf where mask ([b, V] or [V] bool) is True."""
    return tf.where(mask, tf.constant(NEG_INF, scores.dtype), scores)


def suppress_before(scores: tf.Tensor, token_ids: tuple[int, ...], new_tokens: tf.Tensor,
                    min_new_tokens: int) -> tf.Tensor:
    """Stop tokens cannot be chosen while fewer than `min_new_tokens` tokens were generated."""
    mask = np.zeros([scores.shape[-1]], bool)
    mask[list(token_ids)] = True
    active = tf.cast(new_tokens, tf.int32) < min_new_tokens
    return suppress(scores, tf.logical_and(mask, active))


def temperature(scores: tf.Tensor, value: float) -> tf.Tensor:
    return scores / value


def top_k_filter(scores: tf.Tensor, k: int, min_keep: int = 1) -> tf.Tensor:
    """Keep the max(k, min_keep) highest scores of each row (and any tied with the last)."""
    k = min(max(k, min_keep), scores.shape[-1])
    kth = tf.math.top_k(scores, k=k, sorted=True).values[:, -1:]                         # [b, 1]
    return suppress(scores, scores < kth)


def top_p_filter(scores: tf.Tensor, p: float, min_keep: int = 1) -> tf.Tensor:
    """Nucleus filter: keep the most likely tokens whose probability mass reaches `p` (at
    least `min_keep` of them).

    A token survives when the mass of the tokens ranked strictly above it is below p, so the
    most likely token always survives. The cut is expressed as a score threshold: tokens
    tied with the last survivor survive too."""
    ranked = tf.math.top_k(scores, k=scores.shape[-1], sorted=True).values               # [b, V] descending
    mass_above = tf.math.cumsum(tf.nn.softmax(ranked, axis=-1), axis=-1, exclusive=True)
    survivors = tf.reduce_sum(tf.cast(mass_above < p, tf.int32), axis=-1)                # [b] >= 1
    survivors = tf.minimum(tf.maximum(survivors, min_keep), scores.shape[-1])
    threshold = tf.gather(ranked, survivors - 1, axis=1, batch_dims=1)                   # [b]
    return suppress(scores, scores < threshold[:, None])


def process_scores(scores: tf.Tensor, config: GenerationConfig, history: tf.Tensor,
                   history_valid: tf.Tensor, next_slot: tf.Tensor, new_tokens: tf.Tensor) -> tf.Tensor:
    """Every processor `config` turns on, in transformers' order. scores [b, V] float32;
    next_slot: the cache slot the chosen token goes to; new_tokens: tokens generated so far."""
    if config.repetition_penalty != 1.0:
        scores = repetition_penalty(scores, history, history_valid, config.repetition_penalty)
    if config.effective_bad_words:
        scores = suppress(scores, banned_tokens(history, history_valid, next_slot, config.effective_bad_words,
                                                scores.shape[-1]))
    if config.min_new_tokens > 0 and config.stop_token_ids:
        scores = suppress_before(scores, config.stop_token_ids, new_tokens, config.min_new_tokens)
    if config.do_sample:
        # Beam sampling keeps enough tokens per beam to fill its candidates, as transformers does.
        min_keep = config.candidates_per_beam if config.num_beams > 1 else 1
        if config.temperature != 1.0:
            scores = temperature(scores, config.temperature)
        if config.top_k > 0:
            scores = top_k_filter(scores, config.top_k, min_keep)
        if config.top_p < 1.0:
            scores = top_p_filter(scores, config.top_p, min_keep)
    return scores
