"""The Cerebras-style learning-rate list as one Keras schedule.

    learning_rate:
      - {scheduler: Linear, initial_learning_rate: 0.0, end_learning_rate: 1.2e-4, steps: 3000}
      - {scheduler: Cosine, initial_learning_rate: 1.2e-4, alpha: 0.1, decay_steps: 380000}
      - {scheduler: Constant, learning_rate: 1.2e-5}

Each segment is a Keras schedule evaluated on the steps since the segment began; the last
one holds past its end (a Constant, or a decay that has reached its final value).
"""
from __future__ import annotations

import keras
import tensorflow as tf

from config.params import LearningRateSegment, OptimizerParams


def _segment_schedule(segment: LearningRateSegment) -> keras.optimizers.schedules.LearningRateSchedule | float:
    schedules = keras.optimizers.schedules
    if segment.scheduler == "Constant":
        return float(segment.learning_rate)
    if segment.scheduler == "Linear":
        return schedules.PolynomialDecay(segment.initial_learning_rate, segment.length,
                                         end_learning_rate=segment.end_learning_rate, power=1.0)
    if segment.scheduler == "Cosine":
        return schedules.CosineDecay(segment.initial_learning_rate, segment.length, alpha=segment.alpha)
    return schedules.ExponentialDecay(segment.initial_learning_rate, segment.length, segment.decay_rate)


class SegmentedSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """Runs segment i for its length, then segment i+1 from its own step 0."""

    def __init__(self, segments: tuple[LearningRateSegment, ...]):
        self.segments = segments
        self._schedules = [_segment_schedule(s) for s in segments]
        starts, total = [], 0
        for segment in segments:
            starts.append(total)
            total += segment.length or 0
        self._starts = starts

    def __call__(self, step):
        step = tf.cast(step, tf.float32)
        value = tf.constant(0.0, tf.float32)
        # Select the last segment that has started; a chain of where() keeps it graph-friendly.
        for start, schedule in zip(self._starts, self._schedules):
            local = step - float(start)
            current = schedule if isinstance(schedule, float) else schedule(tf.maximum(local, 0.0))
            value = tf.where(local >= 0.0, tf.cast(current, tf.float32), value)
        return value

    def get_config(self):
        return {"segments": [s.__dict__ for s in self.segments]}


def learning_rate_schedule(config: OptimizerParams):
    """A float, or a schedule of the optimizer step, from `optimizer.learning_rate`."""
    if isinstance(config.learning_rate, tuple):
        return SegmentedSchedule(config.learning_rate)
    return float(config.learning_rate)
