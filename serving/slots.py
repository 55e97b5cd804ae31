"""Decoding over a fixed set of cache slots whose rows are at different steps.

A serving batch is S rows of one key/value cache [S, h, L, hd]. Each row holds one sequence,
left-padded like generation/batch.py lays prompts out (so positions, and hence tokens, are
those the Generator computes), but rows joined at different times: each has its own
`next_slot` (where its next chosen token goes) and its own decoding settings as tensors, so
one compiled step serves any mix of greedy and sampling requests.

    prefill_rows(model, prompts [b, P], first_slot, L, settings) -> (state, first tokens)
    step_rows(model, state, settings [S]) -> (state, chosen [S])

`SlotDecoder` keeps the state of S rows in variables (a join scatters one row, not the
batch) and runs up to `steps_per_call` steps per compiled call in a loop that
also ends as soon as a row reaches a stop id or its token budget, so the host syncs once per
call and a finished row frees its slot at once. The host then reads the chosen tokens and
decides who finished (stop id, length, stop string, cancellation); a free row keeps decoding
garbage until a request takes it.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np
import tensorflow as tf

from generation.batch import compiled, key_valid
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
    # The penalty and the sampling filters run only when some row asks for them (a cond, not a
    # select): greedy-only batches skip two [b, V] sorts and b Philox draws of V per step.
    scores = tf.cond(tf.reduce_any(settings.repetition_penalty != 1.0),
                     lambda: repetition_penalty(logits, history, history_valid, settings.repetition_penalty[:, None]),
                     lambda: logits)
    stop_mask = tf.reduce_any(tf.one_hot(settings.stop_ids, vocab, on_value=True, off_value=False,
                                         dtype=tf.bool), axis=1)                             # [b, V]
    early = (new_tokens < settings.min_new_tokens)[:, None]
    scores = suppress(scores, tf.logical_and(stop_mask, early))
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
    return tf.cond(tf.reduce_any(settings.do_sample), sampled, lambda: greedy)


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
    # Prompts attend to prompt slots only: with a static P (a serving bucket) the prefill runs on a
    # P-slot cache, attention over P keys rather than L, and the cache is padded to L after.
    width = tokens.shape[1] if tokens.shape[1] is not None else cache_length
    out = model(tokens, position_ids=positions, attention_mask=tf.cast(valid[:, :width], tf.int32),
                cache=model.empty_cache(batch, width), cache_index=tf.constant(0), last_only=True)
    cache = tf.nest.map_structure(lambda t: tf.pad(t, [[0, 0], [0, 0], [0, cache_length - width], [0, 0]]),
                                  out.cache)                                                  # [b, h, L, hd]
    history = tf.pad(tokens, [[0, 0], [0, cache_length - prompt_slots]])                      # [b, L]
    new_tokens = tf.zeros([batch], tf.int32)
    chosen = choose_tokens(out.logits[:, -1], settings, history, valid, new_tokens)
    next_slot = tf.fill([batch], prompt_slots)
    state = SlotState(cache, write_row_tokens(history, next_slot, chosen), first_slot, next_slot + 1,
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


def reached_stop(chosen: tf.Tensor, settings: RowSettings) -> tf.Tensor:
    """[S] bool: the row chose one of its stop ids (-1, no stop id, matches no token)."""
    return tf.reduce_any(chosen[:, None] == settings.stop_ids, axis=-1)


class SlotDecoder:
    """S rows of cache length L in variables, and the two compiled calls over them:

        admit(row, prompt [1, P], first_slot [1], settings of the row) -> first token [1]
        decode(settings [S], budget [S], limit) -> (chosen [K, S], steps run)

    `decode` runs steps until `limit` (<= K = steps_per_call) are done or a row chose a stop id
    or used its budget (tokens it may still make); rows' tokens after such an end are not read.
    One trace of `admit` per prompt bucket (see `warm_up`), one of `decode`."""

    def __init__(self, model: GPTJModel, slots: int, cache_length: int, compile_mode: str = "xla",
                 steps_per_call: int = 8):
        if steps_per_call < 1:
            raise ValueError(f"steps_per_call={steps_per_call} must be at least 1")
        self.model = model
        self.slots = slots
        self.cache_length = cache_length
        self.steps_per_call = steps_per_call
        self.traces = 0                # compilations so far (a trace of admit or decode; XLA compiles each)
        s, length = slots, cache_length
        # Variables, not tensors passed in and out: a compiled call that returns a new state
        # writes every byte of the cache (no buffer donation from Python). Updating variables
        # cost a fifth of that here (46 MB: 3.5 vs 16.5 ms under XLA on this CPU), a join
        # scatters one row, and a decode call pays the update once for up to K steps.
        self.state = tf.nest.map_structure(
            lambda t: tf.Variable(t, trainable=False),
            SlotState(model.empty_cache(s, length), tf.zeros([s, length], tf.int32), tf.zeros([s], tf.int32),
                      tf.ones([s], tf.int32), tf.zeros([s], tf.int32)))
        # One function per prompt bucket (each traced once: a bucket is a shape, not a retrace).
        # Both bodies are plain TensorFlow (an explicit tf.while_loop): no AutoGraph needed.
        self._compile_mode = compile_mode
        self._admit: dict[int, object] = {}
        self._decode = compiled(tf.autograph.experimental.do_not_convert(self._decode_steps), compile_mode)

    def admit(self, row: int, tokens: np.ndarray, first_slot: np.ndarray, settings: RowSettings) -> np.ndarray:
        """Prefill prompt tokens [1, P] (left padded; P a multiple of the bucket) into `row`."""
        bucket = tokens.shape[1]
        if bucket not in self._admit:
            self._admit[bucket] = compiled(tf.autograph.experimental.do_not_convert(self._admit_row),
                                           self._compile_mode)
        return self._admit[bucket](tf.constant(row, tf.int32), tf.constant(tokens, tf.int32),
                                   tf.constant(first_slot, tf.int32), settings).numpy()

    def decode(self, settings: RowSettings, budget: np.ndarray, limit: int | None = None) -> np.ndarray:
        """Up to `limit` (default K) steps -> the chosen tokens [steps, S] of the steps run."""
        limit = self.steps_per_call if limit is None else min(limit, self.steps_per_call)
        chosen, steps = self._decode(settings, tf.constant(budget, tf.int32), tf.constant(limit, tf.int32))
        return chosen.numpy()[:int(steps)]

    def warm_up(self, prompt_slots: Sequence[int], settings: RowSettings) -> None:
        """Trace and compile `admit` for each prompt bucket and `decode`, before requests come
        (an XLA compilation takes seconds; in a request's path it stalls every slot). One trace
        per bucket is the design, so TensorFlow's "excessive retracing" warning is held back here."""
        logger = tf.get_logger()
        level = logger.level
        logger.setLevel("ERROR")
        try:
            for length in prompt_slots:
                self.admit(0, np.zeros([1, length], np.int32), np.zeros([1], np.int32), row_settings(
                    [GenerationConfig()], [0], [0]))
            self.decode(settings, np.full([self.slots], self.steps_per_call + 1, np.int32), 1)
        finally:
            logger.setLevel(level)

    def _read(self) -> SlotState:
        return tf.nest.map_structure(lambda v: v.read_value(), self.state)

    def _write(self, state: SlotState) -> None:
        tf.nest.map_structure(lambda v, t: v.assign(t), self.state, state)

    def _admit_row(self, row: tf.Tensor, tokens: tf.Tensor, first_slot: tf.Tensor,
                   settings: RowSettings) -> tf.Tensor:
        self.traces += 1               # Python runs only while tracing
        joined, chosen = prefill_rows(self.model, tokens, first_slot, self.cache_length, settings)
        tf.nest.map_structure(lambda v, t: v.scatter_nd_update(row[None, None], t), self.state, joined)
        return chosen

    def _decode_steps(self, settings: RowSettings, budget: tf.Tensor, limit: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        self.traces += 1
        chosen_steps = tf.zeros([self.steps_per_call, self.slots], tf.int32)                 # [K, S]

        def running(step, state, chosen_steps, ended):
            return tf.logical_and(step < limit, tf.logical_not(tf.reduce_any(ended)))

        def advance(step, state, chosen_steps, ended):
            state, chosen = step_rows(self.model, state, settings)
            chosen_steps = tf.tensor_scatter_nd_update(chosen_steps, step[None, None], chosen[None])
            ended = tf.logical_or(reached_stop(chosen, settings), step + 1 >= budget)
            return step + 1, state, chosen_steps, ended

        steps, state, chosen_steps, _ = tf.while_loop(
            running, advance, (tf.constant(0), self._read(), chosen_steps, tf.zeros([self.slots], tf.bool)))
        self._write(state)
        return chosen_steps, steps
