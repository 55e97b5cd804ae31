"""`SummarizationTfRecordsProcessor`: the records of `fine_tuning.abstractive_summarization.prepare`.

They hold the same three features as the Pile records, so reading, sharding, the stateless
shuffle and the resume position are `GptTfRecordsProcessor`'s own (inherited, not copied).
What this adds are the two checks that keep a summarization run from silently training
on the wrong thing:

* every `data_dir` holds the `stats.json` of `prepare` with `record_layout: summarization`
  (packed Pile records would otherwise train on every token);
* every record counts at least one label (`input_mask` has a 1: the summary's eos at least),
  checked per batch inside the pipeline, naming the file.
"""
from __future__ import annotations

import json
import os

import tensorflow as tf

from config.params import ModelParams, TrainInputParams
from input.errors import InputDataError
from input.gpt_tfrecords_processor import GptTfRecordsProcessor, _check

__all__ = ["SummarizationTfRecordsProcessor", "SUMMARIZATION_LAYOUT"]

SUMMARIZATION_LAYOUT = "summarization"
_PREPARE = "python -m fine_tuning.abstractive_summarization.prepare"


class SummarizationTfRecordsProcessor(GptTfRecordsProcessor):
    def __init__(self, section: TrainInputParams, model: ModelParams, key: str):
        super().__init__(section, model, key)
        for directory in section.data_dirs:
            self._check_layout(directory)

    def _check_layout(self, directory: str) -> None:
        path = os.path.join(directory, "stats.json")
        layout = None
        if os.path.isfile(path):
            try:
                with open(path, encoding="utf-8") as f:
                    layout = json.load(f).get("record_layout")
            except (OSError, ValueError, AttributeError):
                layout = None
        if layout != SUMMARIZATION_LAYOUT:
            found = f"its stats.json says record_layout {layout!r}" if os.path.isfile(path) else "it has no stats.json"
            raise InputDataError(
                f"{self.key}.data_dir {directory} does not hold summarization records ({found}); make them with "
                f"{_PREPARE} --output-dir ..., or use data_processor: GptTfRecordsProcessor for packed text")

    def _parse(self, serialized: tf.Tensor, paths: tf.Tensor):
        features, labels = super()._parse(serialized, paths)
        counted = tf.reduce_sum(features["input_mask"], axis=1)                      # [b]
        empty = tf.equal(counted, 0)
        first = tf.argmax(tf.cast(empty, tf.int32))
        message = tf.strings.join([
            tf.gather(paths, first), ": a record has input_mask all 0 (no summary token to learn); "
            f"re-run {_PREPARE} to rewrite it"])
        with tf.control_dependencies([_check(tf.logical_not(tf.reduce_any(empty)), message)]):
            features = {name: tf.identity(value) for name, value in features.items()}
        return features, labels
