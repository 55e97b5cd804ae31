"""Beam groups in the slot batch: a request with num_beams = k holds k slot rows, one per beam.

Each row knows its group: `members` [S, K], the group's slots in beam order (K = the widest
group the decoder serves; a narrower group repeats its last slot, a row outside any group
lists itself), and which beam it is. Every step each row takes its own top C continuations
(C, the candidate axis: the group's top C are among its beams' top C), gathers its group's
k x C of them, running beams and finished list into a [S, K, ...] view (every member builds
the same one), chooses with generation.beam_search.choose_beams, the Generator's own step, and
keeps its beam's share: its new tokens row, running score, finished-list entry, and `source`,
the slot whose cache its beam continues (serving/slots.follow_sources copies it).

    step_beams(scores [R, V], tokens [R, L], next_slot [R], new_tokens [R], BeamRows, BeamSettings)
        -> (tokens [R, L], chosen [R], source [R], BeamRows, stopped [R])

R is the slot axis when decoding, and a group's K rows when it is admitted (its prompt's rows,
all alike, choosing the first token).
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np
import tensorflow as tf

from generation.beam_search import (EXCLUDED, BeamRules, FinishedList, candidate_count, choose_beams,
                                    length_penalty_divisors)
from generation.config import GenerationConfig


class BeamRows(NamedTuple):
    """Per row, its beam's search state (meaningless on rows outside a group)."""
    scores: tf.Tensor          # [R] float32: the running beam's sum of log-probabilities
    done_tokens: tf.Tensor     # [R, L] int32: entry `beam index` of the group's finished list
    done_scores: tf.Tensor     # [R] float32: its length-penalised score
    done_lengths: tf.Tensor    # [R] int32: its new-token count
    done: tf.Tensor            # [R] bool: the entry holds a finished hypothesis
    improvable: tf.Tensor      # [R] bool: the group's list may still improve


class BeamSettings(NamedTuple):
    """Per row, its group (fixed while the group decodes)."""
    members: tf.Tensor         # [R, K] int32: the group's rows in beam order (padded with the last)
    beam_index: tf.Tensor      # [R] int32: which of them the row is
    rules: BeamRules           # [R] each row's group's rules (width 1: not a beam row)


def empty_beam_rows(rows: int, cache_length: int) -> BeamRows:
    return BeamRows(tf.zeros([rows]), tf.zeros([rows, cache_length], tf.int32), tf.zeros([rows]),
                    tf.zeros([rows], tf.int32), tf.zeros([rows], tf.bool), tf.zeros([rows], tf.bool))


def beam_rules(configs: Sequence[GenerationConfig], in_group: Sequence[bool], cache_length: int,
               stop_width: int) -> BeamRules:
    """BeamRules of rows under `configs` (rows not in a group get width 1); stop_width: the width
    of the stop-id table, cache_length bounds max_new_tokens (the divisors' table)."""
    count = len(configs)
    beams, candidates = np.ones([count], np.int32), np.ones([count], np.int32)
    stop_ids = np.full([count, stop_width], -1, np.int32)
    max_new_tokens = np.ones([count], np.int32)
    divisors = np.ones([count, cache_length + 1], np.float32)
    stop_when_full, judge_at_max = np.zeros([count], bool), np.zeros([count], bool)
    for row, (config, grouped) in enumerate(zip(configs, in_group)):
        if not grouped:
            continue
        beams[row], candidates[row] = config.num_beams, candidate_count(config)
        stop_ids[row, :len(config.stop_token_ids)] = config.stop_token_ids
        max_new_tokens[row] = config.max_new_tokens
        divisors[row, :config.max_new_tokens + 1] = length_penalty_divisors(config.max_new_tokens,
                                                                            config.length_penalty)
        stop_when_full[row] = config.early_stopping is True
        judge_at_max[row] = config.early_stopping == "never" and config.length_penalty > 0
    return BeamRules(*(tf.constant(a) for a in (beams, candidates, stop_ids, max_new_tokens, divisors,
                                                stop_when_full, judge_at_max)))


def beam_settings(configs: Sequence[GenerationConfig], groups: Sequence[Sequence[int]], width: int,
                  cache_length: int, stop_width: int) -> BeamSettings:
    """BeamSettings of rows 0..R-1 under `configs`; groups[r]: the rows of row r's beam group in beam
    order (empty: not a beam row). width: K, the widest group."""
    count = len(configs)
    members = np.tile(np.arange(count, dtype=np.int32)[:, None], [1, width])
    beam_index = np.zeros([count], np.int32)
    for row, (config, group) in enumerate(zip(configs, groups)):
        if not group:
            continue
        if len(group) != config.num_beams or len(group) > width or row not in group:
            raise ValueError(f"row {row}: its group {list(group)} must hold it and num_beams={config.num_beams} "
                             f"rows, at most {width}")
        members[row] = list(group) + [group[-1]] * (width - len(group))
        beam_index[row] = list(group).index(row)
    rules = beam_rules(configs, [bool(g) for g in groups], cache_length, stop_width)
    return BeamSettings(tf.constant(members), tf.constant(beam_index), rules)


def candidate_axis(settings: BeamSettings) -> int:
    """The static candidate axis C: enough for the widest group with the most stop ids."""
    return settings.members.shape[1] * max(2, 1 + settings.rules.stop_ids.shape[1])


def step_beams(scores: tf.Tensor, tokens: tf.Tensor, next_slot: tf.Tensor, new_tokens: tf.Tensor, beams: BeamRows,
               settings: BeamSettings) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor, BeamRows, tf.Tensor]:
    """scores [R, V]: each row's processed log-probabilities (log-softmax, then the processors) ->
    (tokens [R, L] with the beam's new token at next_slot, that token [R], source [R] the row whose
    cache the beam continues, the rows' BeamRows, stopped [R]: the row's group ended its search)."""
    width = settings.members.shape[1]
    rules = settings.rules

    def view(values: tf.Tensor) -> tf.Tensor:                       # [R, ...] -> [R, K, ...]
        return tf.gather(values, settings.members)

    candidates = candidate_axis(settings)
    beam_real = tf.range(width)[None, :] < rules.width[:, None]                              # [R, K]
    # Each row's own top C first, so the group view is [R, K, C] rather than [R, K, V]: every
    # member builds its group's view, and a top-k over K x V costs a sort of it on XLA:CPU.
    best, best_ids = tf.math.top_k(scores + beams.scores[:, None], candidates)                # [R, C]
    totals = tf.where(beam_real[:, :, None], view(best), -np.inf)                            # [R, K, C]
    finished = FinishedList(view(beams.done_tokens), view(beams.done_scores), view(beams.done_lengths),
                            view(beams.done), beams.improvable)
    choice = choose_beams(totals, view(tokens), next_slot, new_tokens, finished, rules, candidates,
                          token_ids=view(best_ids))

    def own(values: tf.Tensor) -> tf.Tensor:                        # [R, K, ...] -> [R, ...]: this row's beam
        return tf.gather(values, settings.beam_index, axis=1, batch_dims=1)

    rows = own(choice.tokens)                                                                  # [R, L]
    chosen = tf.gather(rows, next_slot, axis=1, batch_dims=1)
    source = tf.gather(settings.members, own(choice.parents), axis=1, batch_dims=1)           # [R]
    done = choice.finished
    state = BeamRows(own(choice.scores), own(done.tokens), own(done.scores), own(done.lengths), own(done.done),
                     done.improvable)
    return rows, chosen, source, state, choice.stopped()


def first_beam_rows(tokens: tf.Tensor, width: tf.Tensor, rows: int) -> tuple[BeamRows, tf.Tensor, tf.Tensor]:
    """A group entering the search: its prompt row tokens [1, L] as `rows` (K) local rows ->
    (their BeamRows, members [K, K], beam_index [K]). Only beam 0 is live at first (the others
    score EXCLUDED), as BeamDecoder.initial_state sets it; rows past the width repeat the last beam."""
    beam_index = tf.minimum(tf.range(rows), width - 1)                                          # [K]
    local = tf.tile(tokens, [rows, 1])                                                          # [K, L]
    scores = tf.where(beam_index == 0, 0.0, EXCLUDED)
    state = BeamRows(scores, local, tf.fill([rows], EXCLUDED), tf.zeros([rows], tf.int32), tf.zeros([rows], tf.bool),
                     tf.ones([rows], tf.bool))
    return state, tf.tile(beam_index[None], [rows, 1]), beam_index
