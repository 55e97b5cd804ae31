"""Decoding over a fixed set of cache slots whose rows are at different steps.

A serving batch is S rows of one key/value cache [S, h, L, hd]. Each row holds one sequence,
left-padded like generation/batch.py lays prompts out (so positions, and hence tokens, are
those the Generator computes), but rows joined at different times: each has its own
`next_slot` (where its next chosen token goes) and its own decoding settings as tensors, so
one compiled step serves any mix of greedy and sampling requests.

    prefill_rows(model, prompts [b, P], first_slot, L, settings) -> (state, first tokens)
    step_rows(model, state, settings [S]) -> (state, chosen [S])
    step_rows_with_groups(model, state, settings, beams, groups) -> (state, chosen, beams, stopped)

The last lets rows be the beams of beam groups (serving/beam_rows.py) beside greedy and sampled
rows. `SlotDecoder` (serving/slot_decoder.py) keeps the state of S rows in variables (a join
scatters its rows, not the batch) and runs up to `steps_per_call` steps per compiled call in a loop that
also ends as soon as a row reaches a stop id or its token budget, so the host syncs once per
call and a finished row frees its slot at once. The host then reads the chosen tokens and
decides who finished (stop id, length, stop string, cancellation); a free row keeps decoding
garbage until a request takes it.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np
import tensorflow as tf

from generation.batch import key_valid
from generation.config import GenerationConfig
from generation.processors import bad_words_table, banned_by_table, repetition_penalty, suppress, table_fits
from generation.sampling import greedy_tokens
from model import GPTJModel
from serving.beam_rows import BeamRows, BeamSettings, step_beams

MAX_STOP_IDS = 4      # stop ids per request a row can carry (the settings are fixed-shape tensors)
MAX_BAD_WORDS = 16    # bad words per request a row can carry (more: the request runs whole, via the Generator)
MAX_BAD_WORD_TOKENS = 8   # tokens per bad word a row can carry (its table holds the 7 before the last)
REORDER_CHUNK = 16    # cache slots a beam step copies at a time (follow_sources)


class SlotState(NamedTuple):
    cache: tuple               # per block (keys, values) [S, h, L, hd]
    tokens: tf.Tensor          # [S, L] int32: prompt and generated tokens by cache slot
    first_slot: tf.Tensor      # [S] int32: slot of each row's first real token
    next_slot: tf.Tensor       # [S] int32: slot the row's next chosen token goes to
    new_tokens: tf.Tensor      # [S] int32: tokens generated so far


class RowSettings(NamedTuple):
    """Decoding settings, one entry per row (what GenerationConfig says, as tensors)."""
    do_sample: tf.Tensor            # [S] bool
    temperature: tf.Tensor          # [S] float32
    top_k: tf.Tensor                # [S] int32 (0: off)
    top_p: tf.Tensor                # [S] float32 (1: off)
    repetition_penalty: tf.Tensor   # [S] float32 (1: off)
    min_new_tokens: tf.Tensor       # [S] int32
    stop_ids: tf.Tensor             # [S, MAX_STOP_IDS] int32, -1 = none
    seeds: tf.Tensor                # [S] int64
    streams: tf.Tensor              # [S] int64: which of its request's samples the row is
    bad_prefixes: tf.Tensor         # [S, MAX_BAD_WORDS, MAX_BAD_WORD_TOKENS - 1] int32 (bad_words_table)
    bad_last: tf.Tensor             # [S, MAX_BAD_WORDS] int32: each bad word's last token, -1 = no word


def row_settings(configs: Sequence[GenerationConfig], seeds: Sequence[int], streams: Sequence[int]) -> RowSettings:
    """RowSettings for rows decoding under `configs` (host side, NumPy -> tensors)."""
    stop_ids = np.full([len(configs), MAX_STOP_IDS], -1, np.int32)
    for row, config in enumerate(configs):
        if len(config.stop_token_ids) > MAX_STOP_IDS:
            raise ValueError(f"a slot row carries at most {MAX_STOP_IDS} stop token ids, got "
                             f"{len(config.stop_token_ids)}")
        stop_ids[row, :len(config.stop_token_ids)] = config.stop_token_ids
    tables = [bad_words_table(c.effective_bad_words, MAX_BAD_WORDS, MAX_BAD_WORD_TOKENS - 1) for c in configs]
    return RowSettings(
        tf.constant([c.do_sample for c in configs], tf.bool),
        tf.constant([c.temperature for c in configs], tf.float32),
        tf.constant([c.top_k for c in configs], tf.int32),
        tf.constant([c.top_p for c in configs], tf.float32),
        tf.constant([c.repetition_penalty for c in configs], tf.float32),
        tf.constant([c.min_new_tokens for c in configs], tf.int32),
        tf.constant(stop_ids), tf.constant(np.asarray(seeds, np.int64)), tf.constant(np.asarray(streams, np.int64)),
        tf.constant(np.stack([t[0] for t in tables])), tf.constant(np.stack([t[1] for t in tables])))


def no_bad_words(batch: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """RowSettings' bad-word tables for `batch` rows that have none."""
    return (tf.fill(tf.stack([batch, MAX_BAD_WORDS, MAX_BAD_WORD_TOKENS - 1]), -1),
            tf.fill(tf.stack([batch, MAX_BAD_WORDS]), -1))


def supports(config: GenerationConfig, max_beams: int) -> bool:
    """Whether rows of the slot batch can decode under `config`: greedy, sampling, and beam search
    of up to max_beams beams, with up to MAX_STOP_IDS stop ids and MAX_BAD_WORDS bad words of up to
    MAX_BAD_WORD_TOKENS tokens (beam sampling, and settings past those caps, run as whole requests
    through the Generator instead)."""
    beams_fit = config.num_beams == 1 or (not config.do_sample and config.num_beams <= max_beams)
    words_fit = table_fits(config.effective_bad_words, MAX_BAD_WORDS, MAX_BAD_WORD_TOKENS - 1)
    return beams_fit and words_fit and len(config.stop_token_ids) <= MAX_STOP_IDS


# ---- per-row score processing: generation/processors.py's order with tensors per row ----------

def row_gumbel_noise(seeds: tf.Tensor, counters: tf.Tensor, width: int) -> tf.Tensor:
    """[b, width] Gumbel noise; row r's is generation.sampling.gumbel_noise's for (seeds[r],
    counters[r]) exactly (the same stateless draw), for any batch size, static or not."""
    tiny = float(np.finfo(np.float32).tiny)

    def one(args):
        seed, counter = args
        uniform = tf.random.stateless_uniform([width], seed=tf.stack([seed, counter]), minval=tiny, maxval=1.0,
                                              dtype=tf.float32, alg="philox")
        return -tf.math.log(-tf.math.log(uniform))
    return tf.map_fn(one, (seeds, counters), fn_output_signature=tf.float32)


def process_rows(scores: tf.Tensor, settings: RowSettings, history: tf.Tensor, history_valid: tf.Tensor,
                 next_slot: tf.Tensor, new_tokens: tf.Tensor) -> tf.Tensor:
    """scores [b, V] -> [b, V] after the processors that come before the choice (repetition
    penalty, bad words, min_new_tokens), each row under its own settings: process_scores' order.
    next_slot [b]: where each row's chosen token goes (its bad words' prefixes end just before)."""
    vocab = scores.shape[-1]
    # The penalty and the bad words run only when some row asks for them (a cond, not a select).
    scores = tf.cond(tf.reduce_any(settings.repetition_penalty != 1.0),
                     lambda: repetition_penalty(scores, history, history_valid, settings.repetition_penalty[:, None]),
                     lambda: scores)
    scores = tf.cond(tf.reduce_any(settings.bad_last >= 0),
                     lambda: suppress(scores, banned_by_table(history, history_valid, next_slot, settings.bad_prefixes,
                                                              settings.bad_last, vocab)),
                     lambda: scores)
    stop_mask = tf.reduce_any(tf.one_hot(settings.stop_ids, vocab, on_value=True, off_value=False,
                                         dtype=tf.bool), axis=1)                             # [b, V]
    early = (new_tokens < settings.min_new_tokens)[:, None]
    return suppress(scores, tf.logical_and(stop_mask, early))


def pick_tokens(scores: tf.Tensor, settings: RowSettings, new_tokens: tf.Tensor) -> tf.Tensor:
    """Processed scores [b, V] -> [b] int32: argmax, or for sampling rows a draw after temperature,
    top-k and top-p (greedy_tokens / sample_tokens for a row's GenerationConfig)."""
    vocab = scores.shape[-1]
    greedy = greedy_tokens(scores)

    def sampled() -> tf.Tensor:
        scaled = scores / settings.temperature[:, None]
        ranked = tf.sort(scaled, axis=-1, direction="DESCENDING")                            # [b, V]
        k = tf.where(settings.top_k > 0, tf.minimum(settings.top_k, vocab), vocab)
        kth = tf.gather(ranked, k - 1, axis=1, batch_dims=1)                                  # [b]
        scaled = suppress(scaled, scaled < kth[:, None])
        # top-p, as top_p_filter, on the top-k survivors; p = 1 skips it (a cumsum may round past 1)
        ranked = tf.sort(scaled, axis=-1, direction="DESCENDING")
        mass_above = tf.math.cumsum(tf.nn.softmax(ranked, axis=-1), axis=-1, exclusive=True)
        p = settings.top_p[:, None]
        survivors = tf.maximum(tf.reduce_sum(tf.cast(mass_above < p, tf.int32), axis=-1), 1)
        threshold = tf.gather(ranked, survivors - 1, axis=1, batch_dims=1)
        filtered = tf.where(p < 1.0, suppress(scaled, scaled < threshold[:, None]), scaled)
        counters = settings.streams * 2 ** 32 + tf.cast(new_tokens, tf.int64)
        drawn = greedy_tokens(filtered + row_gumbel_noise(settings.seeds, counters, vocab))
        return tf.where(settings.do_sample, drawn, greedy)
    # The sampling filters run only when some row samples: greedy-only batches skip two [b, V]
    # sorts and b Philox draws of V per step.
    return tf.cond(tf.reduce_any(settings.do_sample), sampled, lambda: greedy)


def choose_tokens(logits: tf.Tensor, settings: RowSettings, history: tf.Tensor, history_valid: tf.Tensor,
                  next_slot: tf.Tensor, new_tokens: tf.Tensor) -> tf.Tensor:
    """logits [b, V] float32 -> [b] int32, each row under its own settings. Matches
    process_scores + greedy_tokens / sample_tokens for a row's GenerationConfig: the
    processors that a config turns off are exact identities here (x * 1, x / 1)."""
    return pick_tokens(process_rows(logits, settings, history, history_valid, next_slot, new_tokens), settings,
                       new_tokens)


def choose_rows(logits: tf.Tensor, state: SlotState, settings: RowSettings, beams: BeamRows,
                groups: BeamSettings) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor, BeamRows, tf.Tensor]:
    """The choice of a step with beam groups: logits [R, V] of rows whose next token goes to
    state.next_slot -> (tokens [R, L] with it written, chosen [R], source [R]: the row whose cache
    each row continues, BeamRows, stopped [R]: beam rows whose group's search ended). Beam rows
    choose from log-softmax scores (serving/beam_rows.py), the others as choose_tokens does."""
    rows = tf.range(tf.shape(logits)[0])
    valid = key_valid(state.first_slot, state.next_slot[:, None], state.tokens.shape[1])            # [R, L]
    in_group = groups.rules.width > 1                                                               # [R]
    # A select per row: a greedy or sampled row's scores stay its logits exactly.
    scores = process_rows(tf.where(in_group[:, None], tf.nn.log_softmax(logits, axis=-1), logits), settings,
                          state.tokens, valid, state.next_slot, state.new_tokens)
    chosen = pick_tokens(scores, settings, state.new_tokens)
    written = write_row_tokens(state.tokens, state.next_slot, chosen)

    def with_groups():
        tokens, beam_chosen, source, after, stopped = step_beams(scores, state.tokens, state.next_slot,
                                                                 state.new_tokens, beams, groups)
        return (tf.where(in_group[:, None], tokens, written), tf.where(in_group, beam_chosen, chosen),
                tf.where(in_group, source, rows), after, stopped & in_group)
    # Batches without a beam group skip the group views (a [R, K, V] gather and two top-k).
    return tf.cond(tf.reduce_any(in_group), with_groups,
                   lambda: (written, chosen, rows, beams, tf.zeros_like(in_group)))


def write_row_tokens(tokens: tf.Tensor, slots: tf.Tensor, chosen: tf.Tensor) -> tf.Tensor:
    """tokens [b, L] with chosen[r] written at slots[r]."""
    rows = tf.range(tf.shape(tokens)[0])
    return tf.tensor_scatter_nd_update(tokens, tf.stack([rows, slots], axis=-1), chosen)


# ---- the compiled functions ------------------------------------------------------------------

def prompt_rows(model: GPTJModel, tokens: tf.Tensor, first_slot: tf.Tensor,
                cache_length) -> tuple[SlotState, tf.Tensor]:
    """Left-padded prompts tokens [b, P] -> (their slot state, the next token not chosen yet, and the
    logits of each prompt's last token [b, V]). The prompts write cache slots [0, P) at once."""
    batch, prompt_slots = tf.shape(tokens)[0], tf.shape(tokens)[1]
    positions = tf.maximum(tf.range(prompt_slots)[None, :] - first_slot[:, None], 0)          # [b, P]
    valid = key_valid(first_slot, prompt_slots, cache_length)                                # [b, L]
    # Prompts attend to prompt slots only: with a static P (a serving bucket) the prefill runs on a
    # P-slot cache, attention over P keys rather than L, and the cache is padded to L after.
    width = tokens.shape[1] if tokens.shape[1] is not None else cache_length
    out = model(tokens, position_ids=positions, attention_mask=tf.cast(valid[:, :width], tf.int32),
                cache=model.empty_cache(batch, width), cache_index=tf.constant(0), last_only=True)
    cache = tf.nest.map_structure(lambda t: tf.pad(t, [[0, 0], [0, 0], [0, cache_length - width], [0, 0]]),
                                  out.cache)                                                  # [b, h, L, hd]
    history = tf.pad(tokens, [[0, 0], [0, cache_length - prompt_slots]])                      # [b, L]
    state = SlotState(cache, history, first_slot, tf.fill([batch], prompt_slots), tf.zeros([batch], tf.int32))
    return state, out.logits[:, -1]


def prefill_rows(model: GPTJModel, tokens: tf.Tensor, first_slot: tf.Tensor, cache_length,
                 settings: RowSettings) -> tuple[SlotState, tf.Tensor]:
    """Left-padded prompts tokens [b, P] -> (their slot state with the first new token written, that
    token [b]). The cache is [b, h, cache_length, hd]."""
    state, logits = prompt_rows(model, tokens, first_slot, cache_length)
    valid = key_valid(first_slot, state.next_slot[:, None], cache_length)                     # [b, L]
    chosen = choose_tokens(logits, settings, state.tokens, valid, state.next_slot, state.new_tokens)
    state = state._replace(tokens=write_row_tokens(state.tokens, state.next_slot, chosen),
                           next_slot=state.next_slot + 1, new_tokens=state.new_tokens + 1)
    return state, chosen


def forward_rows(model: GPTJModel, state: SlotState) -> tuple[tf.Tensor, tuple]:
    """Every row's last token through the model, each at its own slot -> (logits [S, V], cache)."""
    last_slot = state.next_slot - 1                                                           # [S]
    last = tf.gather(state.tokens, last_slot, axis=1, batch_dims=1)[:, None]                  # [S, 1]
    positions = tf.maximum(last_slot - state.first_slot, 0)[:, None]                          # [S, 1]
    valid = key_valid(state.first_slot, state.next_slot[:, None], tf.shape(state.tokens)[1])  # [S, L]
    out = model(last, position_ids=positions, attention_mask=tf.cast(valid, tf.int32), cache=state.cache,
                cache_index=last_slot, last_only=True)
    return out.logits[:, -1], out.cache


def next_rows(state: SlotState, cache: tuple, tokens: tf.Tensor) -> SlotState:
    """The state one step on. A free row keeps stepping until a request takes it: its slot stops at
    the last one so its writes stay in range (an active row never passes L - 1: admission leaves
    room for its tokens)."""
    next_slot = tf.minimum(state.next_slot + 1, tf.shape(state.tokens)[1] - 1)
    return SlotState(cache, tokens, state.first_slot, next_slot, state.new_tokens + 1)


def step_rows(model: GPTJModel, state: SlotState, settings: RowSettings) -> tuple[SlotState, tf.Tensor]:
    """One new token for every row (greedy or sampled), each at its own slot -> (state, chosen [S])."""
    logits, cache = forward_rows(model, state)
    valid = key_valid(state.first_slot, state.next_slot[:, None], tf.shape(state.tokens)[1])  # [S, L]
    chosen = choose_tokens(logits, settings, state.tokens, valid, state.next_slot, state.new_tokens)
    return next_rows(state, cache, write_row_tokens(state.tokens, state.next_slot, chosen)), chosen


def follow_sources(cache: tuple, source: tf.Tensor, members: tf.Tensor, first_new: tf.Tensor,
                   end: tf.Tensor) -> tuple:
    """Cache rows [S, h, L, hd] per block where row r's slots [first_new[r], end[r]) are row
    source[r]'s, source[r] one of members[r] [K] (row r's beam group, first_new and end alike in
    it). The slots before first_new must be alike in the group (its prompt), so a beam step
    copies what its beams made, not the whole cache: a gather of every row rewrote all L slots
    of all S rows each step (2x a beam step here). The copy goes by blocks of REORDER_CHUNK
    slots (L is a multiple), one contiguous [C * hd] vector per row and head, over a work list
    of (group, block) pairs: each group some of whose beams moved, from its first new block to
    its last. A pair copies its group's K rows at once, so every read of a block happens before
    its writes (beams may swap rows), and pairs touch disjoint rows or blocks. A loop over block
    offsets for all S rows at once paid every row the longest group's span, moved or not: at
    hidden 4096, 8 groups in 32 rows, one of them 112 tokens in, a decode step took 296-304 ms
    with it and 259-270 with the work list (49 vs 11 ms for the copy alone). The list is worked
    out before the loop: looked up inside it, the step took 60 ms more. A block may start before
    first_new or end past `end`; those slots are alike or not attended yet."""
    rows = tf.range(tf.shape(source)[0])
    keys = cache[0][0]
    heads, length, width = keys.shape[1], keys.shape[2], keys.shape[3]
    blocks = length // REORDER_CHUNK
    moved = tf.gather(source, members) != members                                              # [S, K]
    leads = tf.logical_and(members[:, 0] == rows, tf.reduce_any(moved, axis=1))                # [S]
    start = first_new // REORDER_CHUNK                                                         # [S]
    count = tf.where(leads, (end + REORDER_CHUNK - 1) // REORDER_CHUNK - start, 0)             # [S] pairs
    past = tf.cumsum(count)                                                                    # [S]
    shape = [members.shape[1], heads]
    head_index = tf.broadcast_to(tf.range(heads)[None, :], shape)                              # [K, h]

    def at(row_index, block):                                                                  # [K, h, 3]
        return tf.stack([tf.broadcast_to(row_index[:, None], shape), head_index,
                         tf.broadcast_to(block, shape)], axis=-1)

    # pair i's group's lead row, and its block (pairs past the last are never read)
    pair_index = tf.range(tf.size(rows) * blocks)                                              # [P]
    lead = tf.minimum(tf.reduce_sum(tf.cast(pair_index[:, None] >= past[None, :], tf.int32), axis=1),
                      tf.size(rows) - 1)                                                       # [P]
    pair_block = tf.gather(start + count - past, lead) + pair_index                           # [P]

    def copy(pair, cache):
        group = tf.gather(members, lead[pair])                                                 # [K]
        block = pair_block[pair]
        read, write = at(tf.gather(source, group), block), at(group, block)
        return pair + 1, tf.nest.map_structure(
            lambda t: tf.tensor_scatter_nd_update(t, write, tf.gather_nd(t, read)), cache)

    by_block = tf.nest.map_structure(lambda t: tf.reshape(t, [-1, heads, blocks, REORDER_CHUNK * width]), cache)
    by_block = tf.while_loop(lambda pair, cache: pair < past[-1], copy, (tf.constant(0), by_block))[1]
    return tf.nest.map_structure(lambda t: tf.reshape(t, [-1, heads, length, width]), by_block)


def step_rows_with_groups(model: GPTJModel, state: SlotState, settings: RowSettings, beams: BeamRows,
                          groups: BeamSettings) -> tuple[SlotState, tf.Tensor, BeamRows, tf.Tensor]:
    """step_rows where some rows are beams of a group -> (state, chosen [S], BeamRows, stopped [S]).
    A beam row takes its beam's tokens row and the cache its beam made (follow_sources)."""
    logits, cache = forward_rows(model, state)
    tokens, chosen, source, beams, stopped = choose_rows(logits, state, settings, beams, groups)
    cache = follow_sources(cache, source, groups.members, state.next_slot - state.new_tokens, state.next_slot)
    return next_rows(state, cache, tokens), chosen, beams, stopped


def reached_stop(chosen: tf.Tensor, settings: RowSettings) -> tf.Tensor:
    """[S] bool: the row chose one of its stop ids (-1, no stop id, matches no token)."""
    return tf.reduce_any(chosen[:, None] == settings.stop_ids, axis=-1)
