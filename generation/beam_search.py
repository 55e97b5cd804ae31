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


def hypothesis(ids: list[int], score: float, stop_token_ids: tuple[int, ...]) -> Generation:
    """A finished hypothesis' new tokens as a result: "stop" when it ends with a stop id."""
    stopped = bool(ids) and ids[-1] in stop_token_ids
    return Generation(ids, "stop" if stopped else "length", ids[-1] if stopped else None, score)


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
        count = self.config.num_return_sequences
        scores = state.done_scores.numpy()
        return [hypothesis(ids, float(scores[row, rank]), self.config.stop_token_ids)
                for row, ranked in enumerate(self.hypotheses(state, count)) for rank, ids in enumerate(ranked)]

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
        top_index = None
        if config.do_sample:      # beam sampling: C continuations drawn, in draw order
            top_index = sample_without_replacement(tf.reshape(totals, [b, k * vocab]), state.seeds, state.step,
                                                   candidate_count(config))
        finished = FinishedList(state.done_tokens, state.done_scores, state.done_lengths, state.done,
                                state.improvable)
        groups = tf.fill([b], 1)
        choice = choose_beams(totals, state.tokens, slot * groups, state.step * groups, finished,
                              config_rules(config, b, self.divisors), candidate_count(config), top_index)
        rows = tf.reshape(choice.parents + tf.range(b)[:, None] * k, [-1])                   # [b*k]
        cache = tf.nest.map_structure(lambda t: tf.gather(t, rows, axis=0), state.cache)
        # The batch stops together, as transformers' does: when no list can improve, every list is
        # full (early_stopping=True), or every continuation of every prompt hit.
        stopped = tf.logical_not(tf.reduce_any(choice.finished.improvable) & tf.logical_not(tf.reduce_all(choice.full))
                                 & tf.logical_not(tf.reduce_all(choice.all_hit)))
        done = choice.finished
        return BeamState(cache, choice.tokens, choice.scores, done.tokens, done.scores, done.lengths, done.done,
                         done.improvable, state.first_slot, state.seeds, state.step + 1, stopped)


# ---- one step of beam selection: pure functions shared with serving's slot batch ------------------

class FinishedList(NamedTuple):
    """Each group's finished hypotheses, best first (entries past a group's width are padding)."""
    tokens: tf.Tensor          # [G, K, L] int32
    scores: tf.Tensor          # [G, K] float32: length-penalised scores
    lengths: tf.Tensor         # [G, K] int32: new-token counts
    done: tf.Tensor            # [G, K] bool: entry holds a finished hypothesis
    improvable: tf.Tensor      # [G] bool: the list may still improve


class BeamRules(NamedTuple):
    """Per beam group, what its GenerationConfig says, as tensors (so groups of different
    configs and widths share one compiled step)."""
    width: tf.Tensor           # [G] int32: num_beams k (<= K, the beam axis)
    candidates: tf.Tensor      # [G] int32: candidate_count (<= C, the candidate axis)
    stop_ids: tf.Tensor        # [G, n] int32, -1 = none
    max_new_tokens: tf.Tensor  # [G] int32
    divisors: tf.Tensor        # [G, D] float32: length_penalty_divisors, D > max_new_tokens
    stop_when_full: tf.Tensor  # [G] bool: early_stopping=True
    judge_at_max: tf.Tensor    # [G] bool: early_stopping="never" with length_penalty > 0


class BeamChoice(NamedTuple):
    tokens: tf.Tensor          # [G, K, L] int32: the running beams after this step
    scores: tf.Tensor          # [G, K] float32: their running sums
    parents: tf.Tensor         # [G, K] int32: the beam (0..k-1) each continues
    finished: FinishedList
    full: tf.Tensor            # [G] bool: every entry done and early_stopping=True
    all_hit: tf.Tensor         # [G] bool: every candidate hit (a stop id or max_new_tokens)

    def stopped(self) -> tf.Tensor:
        """[G] bool: the group's search is over (it would stop were it alone in its batch)."""
        return tf.logical_not(self.finished.improvable & tf.logical_not(self.full) & tf.logical_not(self.all_hit))


def config_rules(config: GenerationConfig, groups: int, divisors: np.ndarray) -> BeamRules:
    """BeamRules of `groups` groups under one config (divisors: length_penalty_divisors)."""
    def fill(value, dtype):
        return tf.fill([groups], tf.constant(value, dtype))
    stop_ids = tf.constant(config.stop_token_ids or (-1,), tf.int32)
    return BeamRules(fill(config.num_beams, tf.int32), fill(candidate_count(config), tf.int32),
                     tf.tile(stop_ids[None], [groups, 1]), fill(config.max_new_tokens, tf.int32),
                     tf.tile(tf.constant(divisors)[None], [groups, 1]), fill(config.early_stopping is True, tf.bool),
                     fill(config.early_stopping == "never" and config.length_penalty > 0, tf.bool))


def choose_beams(totals: tf.Tensor, tokens: tf.Tensor, slot: tf.Tensor, step: tf.Tensor, finished: FinishedList,
                 rules: BeamRules, candidates: int, top_index: tf.Tensor | None = None,
                 token_ids: tf.Tensor | None = None) -> BeamChoice:
    """Steps 2-5 of the module docstring for G groups. totals [G, K, N]: each beam's processed
    log-probabilities plus its running sum (-inf on beams past a group's width), for every token
    (N = V) or, with token_ids [G, K, N], for those tokens only: each beam's own top C, in rank
    order (the group's top C are among its beams' top C, and with ties to the lower index in
    both top-k's they come out in the same order); tokens [G, K, L]
    the running beams; slot [G] where the new token goes; step [G] new tokens so far; candidates:
    the static candidate axis C (>= every group's rules.candidates); top_index [G, C] the drawn
    continuations when beam sampling. A group of width k < K, or with fewer than C candidates,
    chooses exactly what it would on axes of its own size: top_k is sorted with ties to the lower
    index, so its first entries are the smaller top_k's, and the entries past them are set to -inf,
    below every real score (real scores are finite: -1e9, not -inf, marks the excluded)."""
    groups, width, entries = totals.shape[0], totals.shape[1], totals.shape[2]
    groups = tf.shape(totals)[0] if groups is None else groups
    length = tokens.shape[2]
    beam_real = tf.range(width)[None, :] < rules.width[:, None]                              # [G, K]
    candidate_real = tf.range(candidates)[None, :] < rules.candidates[:, None]                # [G, C]

    # 2. the C best continuations over the group's beams
    flat = tf.reshape(totals, [groups, width * entries])                                       # [G, K*N]
    if top_index is None:
        top_scores, top_index = tf.math.top_k(flat, candidates)
    else:
        top_scores = tf.gather(flat, top_index, batch_dims=1)                                  # [G, C]
    parent, token = top_index // entries, top_index % entries                                  # [G, C]
    if token_ids is not None:
        token = tf.gather(tf.reshape(token_ids, [groups, width * entries]), top_index, batch_dims=1)
    at_slot = tf.range(length)[None, None, :] == slot[:, None, None]
    continued = tf.where(at_slot, token[:, :, None], tf.gather(tokens, parent, batch_dims=1))  # [G, C, L]
    hits = tf.logical_or(tf.reduce_any(token[:, :, None] == rules.stop_ids[:, None, :], axis=-1),
                         (step + 1 >= rules.max_new_tokens)[:, None])                          # [G, C]

    # 4. running beams: the k best continuations that did not hit
    alive = tf.where(candidate_real, top_scores + tf.cast(hits, tf.float32) * EXCLUDED, -np.inf)
    keep = tf.math.top_k(alive, width).indices                                                  # [G, K]
    scores = tf.gather(alive, keep, batch_dims=1)
    parents = tf.gather(parent, keep, batch_dims=1)

    # 3. finished list
    eligible = tf.logical_and(hits, tf.range(candidates)[None, :] < rules.width[:, None])
    divisor = tf.gather(rules.divisors, step + 1, batch_dims=1)[:, None]                      # [G, 1]
    was_full = tf.reduce_all(finished.done | tf.logical_not(beam_real), axis=-1, keepdims=True)
    final = top_scores / divisor
    final += tf.cast(was_full & rules.stop_when_full[:, None], tf.float32) * EXCLUDED
    final += tf.cast(tf.logical_not(finished.improvable), tf.float32)[:, None] * EXCLUDED
    final += tf.cast(tf.logical_not(eligible), tf.float32) * EXCLUDED
    final = tf.where(candidate_real, final, -np.inf)
    merged_scores = tf.concat([tf.where(beam_real, finished.scores, -np.inf), final], axis=1)  # [G, K + C]
    pick = tf.math.top_k(merged_scores, width).indices

    def merged(old, new):
        return tf.gather(tf.concat([old, new], axis=1), pick, batch_dims=1)

    done_scores = merged(finished.scores, final)
    done = merged(finished.done, eligible)

    # 5. can the finished list still improve?
    best_length = tf.where(rules.judge_at_max, rules.max_new_tokens, step + 1)
    best_running = scores[:, :1] / tf.gather(rules.divisors, best_length, batch_dims=1)[:, None]    # [G, 1]
    worst_done = tf.where(done, tf.reduce_min(tf.where(beam_real, done_scores, np.inf), axis=1, keepdims=True),
                          EXCLUDED)
    improvable = tf.logical_and(finished.improvable,
                                tf.reduce_any((best_running > worst_done) & beam_real, axis=1))
    full = tf.reduce_all(done | tf.logical_not(beam_real), axis=1) & rules.stop_when_full
    all_hit = tf.reduce_all(hits | tf.logical_not(candidate_real), axis=1)
    new_lengths = tf.broadcast_to((step + 1)[:, None], tf.shape(final))
    return BeamChoice(tf.gather(continued, keep, batch_dims=1), scores, parents,
                      FinishedList(merged(finished.tokens, continued), done_scores,
                                   merged(finished.lengths, new_lengths), done, improvable), full, all_hit)
