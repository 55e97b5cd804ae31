"""MLPerf GPT-J's data: `cnn_eval.json`, its prompt, truncation and decoding settings.

A sample is {"instruction", "input" (the article), "output" (the reference highlights)}. The
prompt is the Alpaca "prompt_input" template; its GPT-J tokens are cut to the first 1,919 (a
long article loses its end, "### Response:" included), and beam search continues it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from generation.config import GenerationConfig

INSTRUCTION = "Summarize the following news article:"
PROMPT_TEMPLATE = ("Below is an instruction that describes a task, paired with an input that provides further "
                   "context. Write a response that appropriately completes the request.\n\n"
                   "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:")
MAX_INPUT_TOKENS = 1919
FULL_SAMPLE_COUNT = 13368          # CNN/DailyMail 3.0.0 validation


def generation_config(eos_id: int) -> GenerationConfig:
    """4 beams, early stopping, 30 to 128 new tokens, ending at EOS (padding with EOS)."""
    return GenerationConfig(num_beams=4, early_stopping=True, min_new_tokens=30, max_new_tokens=128,
                            stop_token_ids=(eos_id,), pad_token_id=eos_id)


@dataclass(frozen=True)
class Sample:
    article: str
    reference: str
    instruction: str = INSTRUCTION


def load_samples(path: str, count: int | None = None) -> list[Sample]:
    """The first `count` (all when None) samples of a cnn_eval.json-format file."""
    with open(path, encoding="utf-8") as f:
        try:
            records = json.load(f)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not JSON ({err}); expected MLPerf's cnn_eval.json: a list of "
                             '{"instruction", "input", "output"} objects') from None
    if not isinstance(records, list) or not records:
        raise ValueError(f"{path} holds no samples; expected a non-empty list of "
                         '{"instruction", "input", "output"} objects')
    samples = []
    for index, record in enumerate(records[:count]):
        missing = [key for key in ("instruction", "input", "output")
                   if not isinstance(record, dict) or not isinstance(record.get(key), str)]
        if missing:
            raise ValueError(f"{path}: sample {index} lacks the text field(s) {', '.join(missing)}")
        samples.append(Sample(record["input"], record["output"], record["instruction"]))
    return samples


def prompt_ids(tokenizer, sample: Sample, max_tokens: int = MAX_INPUT_TOKENS) -> list[int]:
    text = PROMPT_TEMPLATE.format(instruction=sample.instruction, input=sample.article)
    return tokenizer.encode(text)[:max_tokens]


# ---- a small local set in the same format (no download), for the tiny runs and the test --------

_SUBJECTS = ["The council", "A local school", "The river authority", "Police", "The new museum", "Scientists",
             "The football club", "Residents", "The mayor", "A charity", "The hospital", "Engineers"]
_VERBS = ["announced", "opened", "rejected", "approved", "reported", "delayed", "celebrated", "reviewed",
          "funded", "closed", "investigated", "expanded"]
_OBJECTS = ["a plan for the harbour", "the annual festival", "a study of the coast", "new cycle lanes",
            "the library extension", "a report on flooding", "the summer programme", "a bridge repair",
            "plans for a stadium", "the train timetable", "a survey of birds", "the market square"]
_WHEN = ["on Monday", "last week", "this morning", "after a long debate", "in March", "for the third time",
         "despite protests", "ahead of schedule"]


def local_samples(count: int, seed: int = 0) -> list[dict]:
    """`count` made-up news articles in cnn_eval.json's format; each reference is the article's
    first three sentences (a lead-3 summary)."""
    rng = np.random.default_rng(seed)
    records = []
    for _ in range(count):
        sentences = [f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} {rng.choice(_WHEN)}."
                     for _ in range(int(rng.integers(5, 12)))]
        records.append({"instruction": INSTRUCTION, "input": " ".join(sentences),
                        "output": "\n".join(sentences[:3])})
    return records


def write_local_set(path: str, count: int, seed: int = 0) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(local_samples(count, seed), f, indent=1)


def sample_texts(records: Sequence[dict]) -> list[str]:
    """Texts to train the tiny run's tokenizer on: the prompts and references."""
    return [PROMPT_TEMPLATE.format(instruction=r["instruction"], input=r["input"]) for r in records] + \
        [r["output"] for r in records]
