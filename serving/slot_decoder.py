"""SlotDecoder: the slot batch's state in variables, and its compiled admit and decode calls.

The row math lives in serving/slots.py (greedy and sampled rows) and serving/beam_rows.py (beam
groups); this module owns the S rows' cache, tokens and beam state as variables, so that a join
scatters its rows and a decode call updates the state once for up to `steps_per_call` steps.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import tensorflow as tf

from generation.batch import compiled
from generation.beam_search import BeamRules, hypothesis
from generation.config import GenerationConfig
from generation.results import Generation
from model import GPTJModel
from serving.beam_rows import BeamSettings, beam_rules, beam_settings, empty_beam_rows, first_beam_rows
from serving.slots import (MAX_STOP_IDS, REORDER_CHUNK, RowSettings, SlotState, choose_rows, prompt_rows,
                           reached_stop, row_settings, step_rows_with_groups)


class SlotDecoder:
    """S rows of cache length L in variables, and the two compiled calls over them:

        admit(rows [k], prompt [1, P], first_slot [1], settings of the request[, its group])
            -> (first tokens [k], whether a group's search already ended)
        decode(settings [S], budget [S], limit[, groups]) -> (chosen [steps, S], stopped [S])

    `decode` runs steps until `limit` (<= K = steps_per_call) are done or a row chose a stop id
    or used its budget (tokens it may still make) or a beam group ended its search; rows' tokens
    after such an end are not read. Beam rows' chosen tokens are their beams' (which reorder);
    a group's answer is its finished list, read by `hypotheses`. One trace of `admit` per prompt
    bucket (see `warm_up`), one of `decode`."""

    def __init__(self, model: GPTJModel, slots: int, cache_length: int, compile_mode: str = "xla",
                 steps_per_call: int = 8, max_beams: int = 4):
        if steps_per_call < 1:
            raise ValueError(f"steps_per_call={steps_per_call} must be at least 1")
        if cache_length % REORDER_CHUNK:
            raise ValueError(f"cache_length={cache_length} must be a multiple of {REORDER_CHUNK} (beam steps copy "
                             "cache blocks of that many slots)")
        if not 1 <= max_beams <= slots:
            raise ValueError(f"max_beams={max_beams} must be between 1 and the slots ({slots}): a beam takes a slot")
        self.model = model
        self.slots = slots
        self.cache_length = cache_length
        self.steps_per_call = steps_per_call
        self.max_beams = max_beams
        self.traces = 0                # compilations so far (a trace of admit or decode; XLA compiles each)
        s, length = slots, cache_length
        # Variables, not tensors passed in and out: a compiled call that returns a new state
        # writes every byte of the cache (no buffer donation from Python). Updating variables
        # cost a fifth of that here (46 MB: 3.5 vs 16.5 ms under XLA on this CPU), a join
        # scatters one row, and a decode call pays the update once for up to K steps.
        def variables(structure):
            return tf.nest.map_structure(lambda t: tf.Variable(t, trainable=False), structure)
        self.state = variables(SlotState(model.empty_cache(s, length), tf.zeros([s, length], tf.int32),
                                         tf.zeros([s], tf.int32), tf.ones([s], tf.int32), tf.zeros([s], tf.int32)))
        self.beams = variables(empty_beam_rows(s, length))
        # One function per prompt bucket (each traced once: a bucket is a shape, not a retrace).
        # Both bodies are plain TensorFlow (an explicit tf.while_loop): no AutoGraph needed.
        self._compile_mode = compile_mode
        self._admit: dict[int, object] = {}
        self._decode = compiled(tf.autograph.experimental.do_not_convert(self._decode_steps), compile_mode)

    def groups(self, configs: Sequence[GenerationConfig], members: Sequence[Sequence[int]]) -> BeamSettings:
        """BeamSettings for the S rows under `configs`; members[r]: row r's group's rows (empty: no group)."""
        return beam_settings(configs, members, self.max_beams, self.cache_length, MAX_STOP_IDS)

    def admit(self, rows: int | Sequence[int], tokens: np.ndarray, first_slot: np.ndarray, settings: RowSettings,
              config: GenerationConfig | None = None) -> tuple[np.ndarray, bool]:
        """Prefill prompt tokens [1, P] (left padded; P a multiple of the bucket) into `rows`: one
        row, or a beam group's num_beams rows under `config` (its first beams chosen) ->
        (first tokens [len(rows)], whether the group's search already ended)."""
        rows = [rows] if isinstance(rows, (int, np.integer)) else list(rows)
        config = config or GenerationConfig()
        if len(rows) != config.num_beams:
            raise ValueError(f"{len(rows)} rows for num_beams={config.num_beams}: a beam group takes one row per beam")
        rules = beam_rules([config], [len(rows) > 1], self.cache_length, MAX_STOP_IDS)
        members = np.asarray(rows + [rows[-1]] * (self.max_beams - len(rows)), np.int32)
        bucket = tokens.shape[1]
        if bucket not in self._admit:
            self._admit[bucket] = compiled(tf.autograph.experimental.do_not_convert(self._admit_rows),
                                           self._compile_mode)
        chosen, stopped = self._admit[bucket](tf.constant(members), tf.constant(tokens, tf.int32),
                                              tf.constant(first_slot, tf.int32), settings, rules)
        return chosen.numpy()[:len(rows)], bool(stopped)

    def decode(self, settings: RowSettings, budget: np.ndarray, limit: int | None = None,
               groups: BeamSettings | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Up to `limit` (default K) steps -> (the chosen tokens [steps, S] of the steps run, [S] bool:
        rows whose beam group ended its search)."""
        limit = self.steps_per_call if limit is None else min(limit, self.steps_per_call)
        groups = self.groups([GenerationConfig()] * self.slots, [()] * self.slots) if groups is None else groups
        chosen, steps, stopped = self._decode(settings, groups, tf.constant(budget, tf.int32),
                                              tf.constant(limit, tf.int32))
        return chosen.numpy()[:int(steps)], stopped.numpy()

    def hypotheses(self, rows: Sequence[int], prompt_slots: int, count: int,
                   config: GenerationConfig) -> list[Generation]:
        """The `count` best finished hypotheses of the beam group in `rows` (beam order), best first,
        as BeamDecoder.results gives them (meaningful once the group's search ended)."""
        tokens, lengths = self.beams.done_tokens.numpy(), self.beams.done_lengths.numpy()
        scores = self.beams.done_scores.numpy()
        return [hypothesis(tokens[row, prompt_slots:prompt_slots + lengths[row]].tolist(), float(scores[row]),
                           config.stop_token_ids) for row in rows[:count]]

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

    def _read(self, structure):
        return tf.nest.map_structure(lambda v: v.read_value(), structure)

    def _write(self, structure, values) -> None:
        tf.nest.map_structure(lambda v, t: v.assign(t), structure, values)

    def _admit_rows(self, members: tf.Tensor, tokens: tf.Tensor, first_slot: tf.Tensor, settings: RowSettings,
                    rules: BeamRules) -> tuple[tf.Tensor, tf.Tensor]:
        """members [K]: the rows (a group's, padded with its last; one row repeated). The prompt runs
        once; a group's K local rows, all alike, choose the first beams as a decode step would."""
        self.traces += 1               # Python runs only while tracing
        joined, logits = prompt_rows(self.model, tokens, first_slot, self.cache_length)
        k = self.max_beams
        width = rules.width[0]
        beams, local_members, beam_index = first_beam_rows(joined.tokens, width, k)
        local = SlotState(None, *(tf.repeat(t, k, axis=0) for t in joined[1:]))

        def tiled(t):                  # [1, ...] -> [K, ...]
            return tf.repeat(t, k, axis=0)
        local_settings = tf.nest.map_structure(tiled, settings)
        local_groups = BeamSettings(local_members, beam_index, tf.nest.map_structure(tiled, rules))
        tokens_rows, chosen, _, beams, stopped = choose_rows(tiled(logits), local, local_settings, beams,
                                                             local_groups)
        index = members[:, None]                                                              # [K, 1]

        def write_cache(rows: tf.Tensor, expand) -> tf.Tensor:
            for variable, value in zip(tf.nest.flatten(self.state.cache), tf.nest.flatten(joined.cache)):
                variable.scatter_nd_update(rows, expand(value))
            return tf.constant(0)
        # the cache: one row, or the group's K (a narrower group writes its last row again, alike)
        tf.cond(width > 1, lambda: write_cache(index, tiled), lambda: write_cache(index[:1], lambda t: t))
        rest = SlotState(None, tokens_rows, local.first_slot, local.next_slot + 1, local.new_tokens + 1)
        for name in ("tokens", "first_slot", "next_slot", "new_tokens"):
            getattr(self.state, name).scatter_nd_update(index, getattr(rest, name))
        tf.nest.map_structure(lambda v, t: v.scatter_nd_update(index, t), self.beams, beams)
        return chosen, tf.reduce_any(stopped)

    def _decode_steps(self, settings: RowSettings, groups: BeamSettings, budget: tf.Tensor,
                      limit: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        self.traces += 1
        chosen_steps = tf.zeros([self.steps_per_call, self.slots], tf.int32)                 # [K, S]
        in_group = groups.rules.width > 1

        def running(step, state, beams, chosen_steps, ended, stopped):
            return tf.logical_and(step < limit, tf.logical_not(tf.reduce_any(ended)))

        def advance(step, state, beams, chosen_steps, ended, stopped):
            state, chosen, beams, stopped = step_rows_with_groups(self.model, state, settings, beams, groups)
            chosen_steps = tf.tensor_scatter_nd_update(chosen_steps, step[None, None], chosen[None])
            row_ended = tf.logical_or(reached_stop(chosen, settings), step + 1 >= budget)
            ended = tf.where(in_group, stopped, row_ended)
            return step + 1, state, beams, chosen_steps, ended, stopped

        none = tf.zeros([self.slots], tf.bool)
        steps, state, beams, chosen_steps, _, stopped = tf.while_loop(
            running, advance, (tf.constant(0), self._read(self.state), self._read(self.beams), chosen_steps, none,
                               none))
        self._write(self.state, state)
        self._write(self.beams, beams)
        return chosen_steps, steps, stopped
