"""Greedy decoding and sampling with the model's key/value cache.

A batch runs as: prefill (all prompt tokens in one call, choosing the first new token),
then `advance`, a compiled `tf.while_loop` that feeds each row its last token, processes
the scores and chooses the next one until a step limit or until every row finished. Both
functions are traced and compiled once per (config, batch, prompt slots, cache length) and
reused; the host only syncs between `advance` calls, which is once per token when it must
watch the text (streaming, stop strings) and once per batch otherwise.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
import tensorflow as tf

from generation.batch import PromptBatch, compiled, forward_slots, key_valid
from generation.config import GenerationConfig
from generation.processors import process_scores
from generation.results import Generation
from generation.sampling import greedy_tokens, sample_tokens
from model import GPTJModel


class TokenState(NamedTuple):
    cache: tuple               # per block (keys, values) [b, h, L, hd]
    tokens: tf.Tensor          # [b, L] int32: prompt and generated tokens by cache slot
    first_slot: tf.Tensor      # [b] int32: slot of each row's first real token
    seeds: tf.Tensor           # [b] int64: sampling seed of each request
    streams: tf.Tensor         # [b] int64: which of its request's samples the row is (0..n-1)
    step: tf.Tensor            # int32: new tokens chosen so far (the same for every row)
    finished: tf.Tensor        # [b] bool
    lengths: tf.Tensor         # [b] int32: new tokens of each row, a final stop token included


class CompiledDecoder:
    """What every decoder holds: one config, one batch shape, and its compiled prefill and
    advance steps (subclasses define `_prefill` and `_advance`)."""

    def __init__(self, model: GPTJModel, config: GenerationConfig, batch_size: int, prompt_slots: int,
                 cache_length: int, compile_mode: str):
        self.model = model
        self.config = config
        self.batch_size = batch_size
        self.prompt_slots = prompt_slots
        self.cache_length = cache_length
        self.prefill = compiled(self._prefill, compile_mode)
        self.advance = compiled(self._advance, compile_mode)


class TokenDecoder(CompiledDecoder):
    """Greedy or sampling decoder for one config and one batch shape."""

    # ---- host side -------------------------------------------------------------------------

    def initial_state(self, batch: PromptBatch, seeds: np.ndarray, streams: np.ndarray | None = None) -> TokenState:
        """seeds [b] int64; streams [b] (default zeros): see TokenState."""
        b, pad = self.batch_size, self.config.pad_token_id
        tokens = np.full([b, self.cache_length], pad, np.int32)
        tokens[:, :self.prompt_slots] = batch.tokens
        return TokenState(self.model.empty_cache(b, self.cache_length), tf.constant(tokens),
                          tf.constant(batch.first_slot), tf.constant(seeds, tf.int64),
                          tf.constant(np.zeros([b]) if streams is None else streams, tf.int64), tf.constant(0),
                          tf.zeros([b], tf.bool), tf.zeros([b], tf.int32))

    def row_tokens(self, state: TokenState) -> list[list[int]]:
        """The new tokens of every row so far (one host sync)."""
        tokens, lengths = state.tokens.numpy(), state.lengths.numpy()
        return [tokens[r, self.prompt_slots:self.prompt_slots + lengths[r]].tolist() for r in range(len(lengths))]

    def is_done(self, state: TokenState) -> bool:
        return bool(int(state.step) >= self.config.max_new_tokens or np.all(state.finished.numpy()))

    def stop_rows(self, state: TokenState, rows: list[int]) -> TokenState:
        """Mark rows finished from the host (a stop string appeared in their text)."""
        finished = state.finished.numpy().copy()
        finished[rows] = True
        return state._replace(finished=tf.constant(finished))

    def results(self, state: TokenState, stopped_by_text: dict[int, str]) -> list[Generation]:
        stops = set(self.config.stop_token_ids)
        out = []
        for row, ids in enumerate(self.row_tokens(state)):
            if row in stopped_by_text:
                out.append(Generation(ids, "stop", stopped_by_text[row]))
            elif ids and ids[-1] in stops:
                out.append(Generation(ids, "stop", ids[-1]))
            else:
                out.append(Generation(ids, "length", None))
        return out

    # ---- compiled ------------------------------------------------------------------------

    def _prefill(self, state: TokenState) -> TokenState:
        prompt = state.tokens[:, :self.prompt_slots]                                    # [b, P]
        logits, cache = forward_slots(self.model, prompt, state.first_slot, tf.constant(0), state.cache)
        return self._choose(state._replace(cache=cache), logits)

    def _advance(self, state: TokenState, until: tf.Tensor) -> TokenState:
        """Decode until `until` new tokens exist or every row finished."""
        def running(state):
            return tf.logical_and(state.step < until, tf.logical_not(tf.reduce_all(state.finished)))

        def step(state):
            slot = self.prompt_slots + state.step - 1                    # the last chosen token's slot
            last = tf.gather(state.tokens, slot[None], axis=1)                                # [b, 1]
            logits, cache = forward_slots(self.model, last, state.first_slot, slot, state.cache)
            return (self._choose(state._replace(cache=cache), logits),)

        return tf.while_loop(running, step, (state,))[0]

    def _choose(self, state: TokenState, logits: tf.Tensor) -> TokenState:
        """logits [b, V] for the token at slot P + step -> the state with it written."""
        config = self.config
        slot = self.prompt_slots + state.step
        history_valid = key_valid(state.first_slot, slot, self.cache_length)               # [b, L]
        scores = process_scores(logits, config, state.tokens, history_valid, slot, state.step)
        if config.do_sample:
            chosen = sample_tokens(scores, state.seeds, state.step, state.streams)
        else:
            chosen = greedy_tokens(scores)                                                  # [b]
        chosen = tf.where(state.finished, config.pad_token_id, chosen)
        at_slot = tf.range(self.cache_length)[None, :] == slot
        tokens = tf.where(at_slot, chosen[:, None], state.tokens)                          # [b, L]
        lengths = tf.where(state.finished, state.lengths, state.step + 1)
        hit_stop = tf.reduce_any(chosen[:, None] == tf.constant(config.stop_token_ids or (-1,), tf.int32),
                                 axis=-1)
        finished = state.finished | hit_stop | (state.step + 1 >= config.max_new_tokens)
        return state._replace(tokens=tokens, step=state.step + 1, finished=finished, lengths=lengths)
