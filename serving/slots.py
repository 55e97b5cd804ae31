"""Decoding over a fixed set of cache slots whose rows are at different steps.

A serving batch is S rows of one key/value cache [S, h, L, hd]. Each row holds one sequence,
left-padded like generation/batch.py lays prompts out (so positions, and hence tokens, are
those the Generator computes), but rows joined at different times: each has its own
`next_slot` (where its next chosen token goes) and its own decoding settings as tensors, so
one compiled step serves any mix of greedy and sampling requests.

    admit(state, row, prompt [1, P], first_slot, settings of the row) -> state, first token
    step(state, settings [S]) -> state, chosen [S]

The host reads `chosen` after every step and decides who finished (stop id, length, stop
string, cancellation); a free row keeps decoding garbage at slot 0 until a request takes it.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np
import tensorflow as tf
from tensorflow.compiler.tf2xla.python.xla import dynamic_update_slice

from generation.batch import key_valid
from generation.config import GenerationConfig
from generation.processors import repetition_penalty, suppress
from generation.sampling import greedy_tokens
from model import GPTJModel

MAX_STOP_IDS = 4      # stop ids per request a row can carry (the settings are fixed-shape tensors)


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


def row_settings(configs: Sequence[GenerationConfig], seeds: Sequence[int], streams: Sequence[int]) -> RowSettings:
    """RowSettings for rows decoding under `configs` (host side, NumPy -> tensors)."""
    stop_ids = np.full([len(configs), MAX_STOP_IDS], -1, np.int32)
    for row, config in enumerate(configs):
        if len(config.stop_token_ids) > MAX_STOP_IDS:
            raise ValueError(f"a slot row carries at most {MAX_STOP_IDS} stop token ids, got "
                             f"{len(config.stop_token_ids)}")
        stop_ids[row, :len(config.stop_token_ids)] = config.stop_token_ids
    return RowSettings(
        tf.constant([c.do_sample for c in configs], tf.bool),
        tf.constant([c.temperature for c in configs], tf.float32),
        tf.constant([c.top_k for c in configs], tf.int32),
        tf.constant([c.top_p for c in configs], tf.float32),
        tf.constant([c.repetition_penalty for c in configs], tf.float32),
        tf.constant([c.min_new_tokens for c in configs], tf.int32),
        tf.constant(stop_ids), tf.constant(np.asarray(seeds, np.int64)), tf.constant(np.asarray(streams, np.int64)))


def supports(config: GenerationConfig) -> bool:
    """Whether rows of the slot batch can decode under `config` (beam search and bad words run
    as whole requests through the Generator instead)."""
    return config.num_beams == 1 and not config.effective_bad_words and len(config.stop_token_ids) <= MAX_STOP_IDS


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


def choose_tokens(logits: tf.Tensor, settings: RowSettings, history: tf.Tensor, history_valid: tf.Tensor,
                  new_tokens: tf.Tensor) -> tf.Tensor:
    """logits [b, V] float32 -> [b] int32, each row under its own settings. Matches
    process_scores + greedy_tokens / sample_tokens for a row's GenerationConfig: the
    processors that a config turns off are exact identities here (x * 1, x / 1)."""
    vocab = logits.shape[-1]
    scores = repetition_penalty(logits, history, history_valid, settings.repetition_penalty[:, None])
    stop_mask = tf.reduce_any(tf.one_hot(settings.stop_ids, vocab, on_value=True, off_value=False,
                                         dtype=tf.bool), axis=1)                             # [b, V]
    early = (new_tokens < settings.min_new_tokens)[:, None]
    scores = suppress(scores, tf.logical_and(stop_mask, early))
    greedy = greedy_tokens(scores)
    scaled = scores / settings.temperature[:, None]
    ranked = tf.sort(scaled, axis=-1, direction="DESCENDING")                                # [b, V]
    k = tf.where(settings.top_k > 0, tf.minimum(settings.top_k, vocab), vocab)
    kth = tf.gather(ranked, k - 1, axis=1, batch_dims=1)                                      # [b]
    scaled = suppress(scaled, scaled < kth[:, None])
    # top-p, as top_p_filter, on the top-k survivors; p = 1 skips it (a cumsum may round past 1)
    ranked = tf.sort(scaled, axis=-1, direction="DESCENDING")
    mass_above = tf.math.cumsum(tf.nn.softmax(ranked, axis=-1), axis=-1, exclusive=True)
    p = settings.top_p[:, None]
    survivors = tf.maximum(tf.reduce_sum(tf.cast(mass_above < p, tf.int32), axis=-1), 1)
    threshold = tf.gather(ranked, survivors - 1, axis=1, batch_dims=1)
    filtered = tf.where(p < 1.0, suppress(scaled, scaled < threshold[:, None]), scaled)
    counters = settings.streams * 2 ** 32 + tf.cast(new_tokens, tf.int64)
    sampled = greedy_tokens(filtered + row_gumbel_noise(settings.seeds, counters, vocab))
    return tf.where(settings.do_sample, sampled, greedy)


def write_row_tokens(tokens: tf.Tensor, slots: tf.Tensor, chosen: tf.Tensor) -> tf.Tensor:
    """tokens [b, L] with chosen[r] written at slots[r]."""
    rows = tf.range(tf.shape(tokens)[0])
    return tf.tensor_scatter_nd_update(tokens, tf.stack([rows, slots], axis=-1), chosen)


# ---- the compiled functions ------------------------------------------------------------------

def prefill_rows(model: GPTJModel, tokens: tf.Tensor, first_slot: tf.Tensor, cache_length,
                 settings: RowSettings) -> tuple[SlotState, tf.Tensor]:
    """Left-padded prompts tokens [b, P] -> (their slot state with the first new token written, that
    token [b]). The cache is [b, h, cache_length, hd]; the prompts write slots [0, P) at once."""
    batch, prompt_slots = tf.shape(tokens)[0], tf.shape(tokens)[1]
    positions = tf.maximum(tf.range(prompt_slots)[None, :] - first_slot[:, None], 0)          # [b, P]
    valid = key_valid(first_slot, prompt_slots, cache_length)                                # [b, L]
    cache = model.empty_cache(batch, cache_length)
    out = model(tokens, position_ids=positions, attention_mask=tf.cast(valid, tf.int32), cache=cache,
                cache_index=tf.constant(0), last_only=True)
    history = tf.pad(tokens, [[0, 0], [0, cache_length - prompt_slots]])                      # [b, L]
    new_tokens = tf.zeros([batch], tf.int32)
    chosen = choose_tokens(out.logits[:, -1], settings, history, valid, new_tokens)
    next_slot = tf.fill([batch], prompt_slots)
    state = SlotState(out.cache, write_row_tokens(history, next_slot, chosen), first_slot, next_slot + 1,
                      new_tokens + 1)
    return state, chosen


def step_rows(model: GPTJModel, state: SlotState, settings: RowSettings) -> tuple[SlotState, tf.Tensor]:
    """One new token for every row, each at its own slot -> (state, chosen [S])."""
    cache_length = tf.shape(state.tokens)[1]
    last_slot = state.next_slot - 1                                                           # [S]
    last = tf.gather(state.tokens, last_slot, axis=1, batch_dims=1)[:, None]                  # [S, 1]
    positions = tf.maximum(last_slot - state.first_slot, 0)[:, None]                          # [S, 1]
    valid = key_valid(state.first_slot, state.next_slot[:, None], cache_length)              # [S, L]
    out = model(last, position_ids=positions, attention_mask=tf.cast(valid, tf.int32), cache=state.cache,
                cache_index=last_slot, last_only=True)
    chosen = choose_tokens(out.logits[:, -1], settings, state.tokens, valid, state.new_tokens)
    tokens = write_row_tokens(state.tokens, state.next_slot, chosen)
    # A free row keeps stepping until a request takes it: its slot stops at the last one so its
    # writes stay in range (an active row never passes L - 1: admission leaves room for its tokens).
    next_slot = tf.minimum(state.next_slot + 1, cache_length - 1)
    return SlotState(out.cache, tokens, state.first_slot, next_slot, state.new_tokens + 1), chosen


def insert_row(state: SlotState, row: tf.Tensor, joined: SlotState) -> SlotState:
    """state with its row `row` replaced by the one-row state `joined` (same cache length): a
    dynamic update slice per tensor, so joining costs one row's cache, not the batch's."""
    def put(whole, one):
        start = tf.concat([row[None], tf.zeros([len(whole.shape) - 1], tf.int32)], axis=0)
        return dynamic_update_slice(whole, one, start)
    return tf.nest.map_structure(put, state, joined)


class SlotDecoder:
    """The compiled admit/step pair for S slots of cache length L (one trace per prompt bucket
    for admit, one for step)."""

    def __init__(self, model: GPTJModel, slots: int, cache_length: int, compile_mode: str = "xla"):
        from generation.batch import compiled
        self.model = model
        self.slots = slots
        self.cache_length = cache_length
        self.admit = compiled(self._admit, compile_mode)
        self.step = compiled(self._step, compile_mode)

    def empty_state(self) -> SlotState:
        s, length = self.slots, self.cache_length
        return SlotState(self.model.empty_cache(s, length), tf.zeros([s, length], tf.int32),
                         tf.zeros([s], tf.int32), tf.ones([s], tf.int32), tf.zeros([s], tf.int32))

    def _admit(self, state: SlotState, row: tf.Tensor, tokens: tf.Tensor, first_slot: tf.Tensor,
               settings: RowSettings) -> tuple[SlotState, tf.Tensor]:
        joined, chosen = prefill_rows(self.model, tokens, first_slot, self.cache_length, settings)
        return insert_row(state, row, joined), chosen

    def _step(self, state: SlotState, settings: RowSettings) -> tuple[SlotState, tf.Tensor]:
        return step_rows(self.model, state, settings)
