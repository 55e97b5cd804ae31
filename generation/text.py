"""Text in, text out: tokenization, stop strings and streaming around the Generator.

Stop markers are never part of a completion: a final stop token is dropped from
`token_ids`, and the text is cut just before the first stop string (the tokens that spelled
it stay in `token_ids`, since a token can hold text on both sides of the cut).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

from generation.config import GenerationConfig
from generation.generator import Generator
from input.tokenizer import GptTokenizer

REPLACEMENT = "\ufffd"   # what decoding shows for the first bytes of a split UTF-8 character


@dataclass(frozen=True)
class Completion:
    prompt: str
    completion: str
    token_ids: list[int]              # generated tokens, without a final stop token
    finish_reason: str                # "stop" | "length"
    stop: int | str | None = None     # the stop token id or stop string that ended generation
    score: float | None = None        # beam search score
    sequence: int | None = None       # with num_return_sequences > 1: which of the prompt's (0 = first)

    def record(self) -> dict:
        """The JSON object written per completion by predict mode."""
        record = {"prompt": self.prompt, "completion": self.completion, "token_ids": self.token_ids,
                  "finish_reason": self.finish_reason, "stop": self.stop}
        if self.sequence is not None:
            record["sequence"] = self.sequence
        if self.score is not None:
            record["score"] = self.score
        return record


def find_stop_string(text: str, stop_strings: Sequence[str]) -> tuple[int, str] | None:
    """(start, stop string) of the earliest stop string in text (the first listed among those
    starting at the same place), or None."""
    found = [(text.find(s), i, s) for i, s in enumerate(stop_strings) if s in text]
    if not found:
        return None
    start, _, string = min(found)
    return start, string


def held_back(text: str, stop_strings: Sequence[str]) -> int:
    """How many trailing characters might still become a stop string (or a split character),
    so a stream must not show them yet."""
    longest = 0
    for string in stop_strings:
        for size in range(min(len(string) - 1, len(text)), longest, -1):
            if text.endswith(string[:size]):
                longest = size
                break
    if text.endswith(REPLACEMENT):
        longest = max(longest, len(text) - len(text.rstrip(REPLACEMENT)))
    return longest


class TextStream:
    """Shows one growing completion piece by piece through `write`, never showing text that
    a later token could change (a split UTF-8 character, the start of a stop string) or that
    the final completion will not contain (the stop token, a stop string)."""

    def __init__(self, tokenizer: GptTokenizer, config: GenerationConfig, write: Callable[[str], None]):
        self.tokenizer = tokenizer
        self.config = config
        self.write = write
        self.shown = ""

    def update(self, token_ids: list[int]) -> None:
        ids = strip_stop_token(token_ids, self.config.stop_token_ids)
        text = self.tokenizer.decode(ids, skip_unknown=True)
        found = find_stop_string(text, self.config.stop_strings)
        if found:
            text = text[:found[0]]
        else:
            text = text[:len(text) - held_back(text, self.config.stop_strings)]
        self._show(text)

    def finish(self, completion: str) -> None:
        self._show(completion)

    def _show(self, text: str) -> None:
        if text.startswith(self.shown) and len(text) > len(self.shown):
            self.write(text[len(self.shown):])
            self.shown = text


def strip_stop_token(token_ids: list[int], stop_token_ids: Sequence[int]) -> list[int]:
    return token_ids[:-1] if token_ids and token_ids[-1] in stop_token_ids else token_ids


def stop_string_checker(tokenizer: GptTokenizer, config: GenerationConfig):
    """The Generator's stop_checker: {row: stop string} for rows whose completion text holds one."""
    def check(rows: list[list[int]]) -> dict[int, str]:
        stopped = {}
        for row, ids in enumerate(rows):
            text = tokenizer.decode(strip_stop_token(ids, config.stop_token_ids), skip_unknown=True)
            found = find_stop_string(text, config.stop_strings)
            if found:
                stopped[row] = found[1]
        return stopped
    return check


def complete(generator: Generator, tokenizer: GptTokenizer, prompts: Sequence[str], config: GenerationConfig,
             seeds: Sequence[int] | None = None, on_text: Callable[[str], None] | None = None) -> list[Completion]:
    """Completions of text prompts (config.num_return_sequences per prompt, grouped by prompt).
    on_text streams a single prompt's completion as it grows."""
    count = config.num_return_sequences
    if on_text is not None and len(prompts) * count != 1:
        raise ValueError(f"streaming shows one completion; got {len(prompts)} prompts x {count} sequences")
    tokenizer.check_fits_model(generator.model.config.vocab_size)
    prompt_ids = tokenizer.encode_batch(prompts)
    stream = TextStream(tokenizer, config, on_text) if on_text is not None else None
    results = generator.generate(
        prompt_ids, config, seeds,
        on_tokens=(lambda rows: stream.update(rows[0])) if stream is not None else None,
        stop_checker=stop_string_checker(tokenizer, config) if config.stop_strings else None)
    completions = []
    for index, result in enumerate(results):
        ids = strip_stop_token(result.token_ids, config.stop_token_ids) if isinstance(result.stop, int) \
            else result.token_ids
        text = tokenizer.decode(ids, skip_unknown=True)
        if isinstance(result.stop, str):
            text = text[:find_stop_string(text, config.stop_strings)[0]]
        completions.append(Completion(prompts[index // count], text, ids, result.finish_reason, result.stop,
                                      result.score, index % count if count > 1 else None))
    if stream is not None:
        stream.finish(completions[0].completion)
    return completions
