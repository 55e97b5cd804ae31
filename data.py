"""The runtime's one door to the data: `input_fn(params, mode, input_context, data_position)`.

The processor is chosen by name (`data_processor:` in the section), as in the Cerebras
Model Zoo: TRAIN reads `train_input`, EVAL and PREDICT read `eval_input`. The dataset
yields `(features, labels)`: {"input_ids", "input_mask"} int32 [batch, seq] and labels
int32 [batch, seq]; docs/data.md describes the records and the meaning of the mask.
"""
from __future__ import annotations

from input.gpt_tfrecords_processor import GptTfRecordsProcessor
from input.summarization_processor import SummarizationTfRecordsProcessor
from config import modes
from config.params import Params, ParamsError

__all__ = ["PROCESSORS", "SECTION_OF_MODE", "input_fn"]

PROCESSORS = {"GptTfRecordsProcessor": GptTfRecordsProcessor,
              "SummarizationTfRecordsProcessor": SummarizationTfRecordsProcessor}
SECTION_OF_MODE = {modes.TRAIN: "train_input", modes.EVAL: "eval_input", modes.PREDICT: "eval_input"}


def input_fn(params: Params, mode: str, input_context=None, data_position: int = 0):
    """A `tf.data.Dataset` for `mode`, sharded by `input_context`, starting after `data_position` batches.

    `data_position` is the number of batches this input pipeline already yielded (saved in
    the checkpoint), so a resumed run sees the data an uninterrupted run would.
    """
    if mode not in SECTION_OF_MODE:
        raise ValueError(f"mode {mode!r} is not one of {', '.join(modes.ALL)}")
    key = SECTION_OF_MODE[mode]
    section = getattr(params, key)
    if section is None:
        raise ParamsError(f"mode {mode!r} reads params.{key}, which is missing; add a `{key}:` section with "
                          "data_dir (and batch_size, max_sequence_length) to the params file")
    processor = PROCESSORS.get(section.data_processor)
    if processor is None:     # the schema's Literal already narrows this; kept for new processors
        raise ParamsError(f"{key}.data_processor={section.data_processor!r} is not known; use one of "
                          f"{', '.join(sorted(PROCESSORS))}")
    return processor(section, params.model, key).create_dataset(input_context, data_position)
