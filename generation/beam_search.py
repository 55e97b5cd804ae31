"""Beam search with the key/value cache, following transformers' (v4.50+) beam search rules.

Each step, for every prompt:
1. scores = log_softmax(logits), then the logit processors; add each beam's running sum.
2. Keep the C best (beam, token) continuations over all beams, C = max(2, 1 + #stop ids) x
   num_beams, so that num_beams of them are still open even if the best ones all stop.
   Beam sampling (do_sample) instead draws C continuations from softmax(scores) without
   replacement, in draw order; the sampling filters then keep >= C / num_beams tokens per beam.
3. A continuation "hits" when its token is a stop id or max_new_tokens is reached. Among the
   first num_beams continuations, those that hit are finished hypotheses with score
   sum / new_tokens ** length_penalty; they enter the finished list (num_beams best kept) unless
   the list can no longer improve (see below) or, with early_stopping=True, it is full.
4. The num_beams best continuations that did not hit become the running beams; the cache rows
   are gathered to follow their parents.
5. The list "can no longer improve" once the best running beam, scored as if it finished now
   (or at max_new_tokens for early_stopping="never" with length_penalty > 0), cannot beat the
   worst finished hypothesis. The search ends when no prompt can improve, when every list is
   full and early_stopping=True, or when every continuation hit.
The answer is the best finished hypothesis. Scores use -1e9, not -inf, for "excluded", as
the reference does, so sums stay finite and comparisons agree with it.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
import tensorflow as tf

from generation.batch import PromptBatch, forward_slots, key_valid
from generation.config import GenerationConfig
from generation.decode import CompiledDecoder
from generation.processors import process_scores
from generation.results import Generation
from generation.sampling import sample_without_replacement
from model import GPTJModel

EXCLUDED = -1.0e9


class BeamState(NamedTuple):
    cache: tuple               # per block (keys, values) [b * k, h, L, hd] (b rows before prefill)
    tokens: tf.Tensor          # [b, k, L] int32: running hypotheses by cache slot
    scores: tf.Tensor          # [b, k] float32: running sums of log-probabilities
    done_tokens: tf.Tensor     # [b, k, L] int32: finished hypotheses, best first
    done_scores: tf.Tensor     # [b, k] float32: their length-penalised scores
    done_lengths: tf.Tensor    # [b, k] int32: their new-token counts
    done: tf.Tensor            # [b, k] bool: entry holds a finished hypothesis
    improvable: tf.Tensor      # [b] bool: the finished list may still improve
    first_slot: tf.Tensor      # [b] int32
    seeds: tf.Tensor           # [b] int64: beam sampling seed of each request
    step: tf.Tensor            # int32: new tokens so far
    stopped: tf.Tensor         # bool: the search is over for the whole batch


def length_penalty_divisors(max_new_tokens: int, length_penalty: float) -> np.ndarray:
    """[max_new_tokens + 1] float32: n ** length_penalty for n new tokens, computed in float64
    and rounded once, as the reference's Python-scalar division does (index 0 unused)."""
    return np.array([1.0] + [n ** length_penalty for n in range(1, max_new_tokens + 1)], np.float32)


def candidate_count(config: GenerationConfig) -> int:
    return config.candidates_per_beam * config.num_beams


class BeamDecoder(CompiledDecoder):
    """Beam search for one config and one batch shape (same interface as TokenDecoder)."""

    def __init__(self, model: GPTJModel, config: GenerationConfig, batch_size: int, prompt_slots: int,
                 cache_length: int, compile_mode: str):
        self.divisors = length_penalty_divisors(config.max_new_tokens, config.length_penalty)
        super().__init__(model, config, batch_size, prompt_slots, cache_length, compile_mode)

    # ---- host side -------------------------------------------------------------------------

    def initial_state(self, batch: PromptBatch, seeds: np.ndarray, streams: np.ndarray | None = None) -> BeamState:
        """seeds [b]: used by beam sampling; streams: accepted for the decoders' common
        interface (a prompt's several answers are its best beams, not separate rows)."""
        b, k, length = self.batch_size, self.config.num_beams, self.cache_length
        tokens = np.full([b, k, length], self.config.pad_token_id, np.int32)
        tokens[:, :, :self.prompt_slots] = batch.tokens[:, None, :]
        scores = np.full([b, k], EXCLUDED, np.float32)
        scores[:, 0] = 0.0       # only beam 0 is live at first, so the k beams do not start identical
        return BeamState(self.model.empty_cache(b, length), tf.constant(tokens), tf.constant(scores),
                         tf.constant(tokens), tf.fill([b, k], EXCLUDED), tf.zeros([b, k], tf.int32),
                         tf.zeros([b, k], tf.bool), tf.ones([b], tf.bool), tf.constant(batch.first_slot),
                         tf.constant(seeds, tf.int64), tf.constant(0), tf.constant(False))

    def hypotheses(self, state: BeamState, count: int) -> list[list[list[int]]]:
        """[row][rank] the new tokens of every row's `count` best finished hypotheses, best
        first (one host read; meaningful once done)."""
        tokens, lengths = state.done_tokens.numpy(), state.done_lengths.numpy()         # [b, k, L], [b, k]
        start = self.prompt_slots
        return [[tokens[row, rank, start:start + lengths[row, rank]].tolist() for rank in range(count)]
                for row in range(self.batch_size)]

    def row_tokens(self, state: BeamState) -> list[list[int]]:
        """The best finished hypothesis of every row (meaningful once done)."""
        return [ranked[0] for ranked in self.hypotheses(state, 1)]

    def is_done(self, state: BeamState) -> bool:
        return bool(state.stopped.numpy()) or int(state.step) >= self.config.max_new_tokens

    def results(self, state: BeamState, stopped_by_text: dict[int, str]) -> list[Generation]:
        """The num_return_sequences best finished hypotheses of every row, best first, rows in
        order (row r's at [r * n, (r + 1) * n), as transformers returns them)."""
        stops = set(self.config.stop_token_ids)
        count = self.config.num_return_sequences
        scores = state.done_scores.numpy()
        out = []
        for row, ranked in enumerate(self.hypotheses(state, count)):
            for rank, ids in enumerate(ranked):
                stopped = bool(ids) and ids[-1] in stops
                out.append(Generation(ids, "stop" if stopped else "length", ids[-1] if stopped else None,
                                      float(scores[row, rank])))
        return out

    # ---- compiled ------------------------------------------------------------------------

    def _prefill(self, state: BeamState) -> BeamState:
        """Run each prompt once, then copy its cache and scores to its k beams."""
        k = self.config.num_beams
        prompt = state.tokens[:, 0, :self.prompt_slots]                                  # [b, P]
        logits, cache = forward_slots(self.model, prompt, state.first_slot, tf.constant(0), state.cache)
        cache = tf.nest.map_structure(lambda t: tf.repeat(t, k, axis=0), cache)           # [b*k, h, L, hd]
        return self._step(state._replace(cache=cache), tf.repeat(logits, k, axis=0))

    def _advance(self, state: BeamState, until: tf.Tensor) -> BeamState:
        b, k = self.batch_size, self.config.num_beams

        def running(state):
            return tf.logical_and(state.step < until, tf.logical_not(state.stopped))

        def step(state):
            slot = self.prompt_slots + state.step - 1
            last = tf.reshape(tf.gather(state.tokens, slot[None], axis=2), [b * k, 1])    # [b*k, 1]
            logits, cache = forward_slots(self.model, last, tf.repeat(state.first_slot, k), slot, state.cache)
            return (self._step(state._replace(cache=cache), logits),)

        return tf.while_loop(running, step, (state,))[0]

    def _step(self, state: BeamState, logits: tf.Tensor) -> BeamState:
        """logits [b*k, V] of every running beam -> the state after choosing one more token."""
        config = self.config
        b, k, length = self.batch_size, config.num_beams, self.cache_length
        vocab = logits.shape[-1]
        slot = self.prompt_slots + state.step
        history = tf.reshape(state.tokens, [b * k, length])
        history_valid = key_valid(tf.repeat(state.first_slot, k), slot, length)            # [b*k, L]
        log_probs = process_scores(tf.nn.log_softmax(logits, axis=-1), config, history, history_valid,
                                   slot, state.step)
        totals = tf.reshape(log_probs, [b, k, vocab]) + state.scores[:, :, None]          # [b, k, V]

        # 2. the C best continuations over all beams (beam sampling: C drawn, in draw order)
        flat = tf.reshape(totals, [b, k * vocab])                                           # [b, k*V]
        if config.do_sample:
            top_index = sample_without_replacement(flat, state.seeds, state.step, candidate_count(config))
            top_scores = tf.gather(flat, top_index, batch_dims=1)                           # [b, C]
        else:
            top_scores, top_index = tf.math.top_k(flat, candidate_count(config))
        parent, token = top_index // vocab, top_index % vocab                               # [b, C]
        at_slot = tf.range(length)[None, None, :] == slot
        candidates = tf.where(at_slot, token[:, :, None], tf.gather(state.tokens, parent, batch_dims=1))
        stop_ids = tf.constant(config.stop_token_ids or (-1,), tf.int32)
        hits = tf.logical_or(tf.reduce_any(token[:, :, None] == stop_ids, axis=-1),
                             state.step + 1 >= config.max_new_tokens)                     # [b, C]

        # 4. running beams: the k best continuations that did not hit
        alive = top_scores + tf.cast(hits, tf.float32) * EXCLUDED
        keep = tf.math.top_k(alive, k).indices                                              # [b, k]
        tokens = tf.gather(candidates, keep, batch_dims=1)
        scores = tf.gather(alive, keep, batch_dims=1)
        parents = tf.gather(parent, keep, batch_dims=1)

        # 3. finished list
        eligible = tf.logical_and(hits, tf.range(candidate_count(config)) < k)
        final = top_scores / tf.gather(self.divisors, state.step + 1)
        if config.early_stopping is True:
            final += tf.cast(tf.reduce_all(state.done, axis=-1, keepdims=True), tf.float32) * EXCLUDED
        final += tf.cast(tf.logical_not(state.improvable), tf.float32)[:, None] * EXCLUDED
        final += tf.cast(tf.logical_not(eligible), tf.float32) * EXCLUDED
        merged_scores = tf.concat([state.done_scores, final], axis=1)                       # [b, k + C]
        pick = tf.math.top_k(merged_scores, k).indices
        new_lengths = tf.fill(tf.shape(final), state.step + 1)

        def merged(old, new):
            return tf.gather(tf.concat([old, new], axis=1), pick, batch_dims=1)

        done_tokens = merged(state.done_tokens, candidates)
        done_scores = merged(state.done_scores, final)
        done_lengths = merged(state.done_lengths, new_lengths)
        done = merged(state.done, eligible)

        rows = tf.reshape(parents + tf.range(b)[:, None] * k, [-1])                          # [b*k]
        cache = tf.nest.map_structure(lambda t: tf.gather(t, rows, axis=0), state.cache)

        # 5. can the finished list still improve?
        new_step = state.step + 1
        if config.early_stopping == "never" and config.length_penalty > 0:
            best_length = tf.constant(config.max_new_tokens)
        else:
            best_length = new_step
        best_running = scores[:, :1] / tf.gather(self.divisors, best_length)              # [b, 1]
        worst_done = tf.where(done, tf.reduce_min(done_scores, axis=1, keepdims=True), EXCLUDED)
        improvable = tf.logical_and(state.improvable, tf.reduce_any(best_running > worst_done, axis=1))
        lists_full = tf.logical_and(tf.reduce_all(done), config.early_stopping is True)
        stopped = tf.logical_not(tf.reduce_any(improvable) & tf.logical_not(lists_full)
                                 & tf.logical_not(tf.reduce_all(hits)))
        return BeamState(cache, tokens, scores, done_tokens, done_scores, done_lengths, done, improvable,
                         state.first_slot, state.seeds, new_step, stopped)
