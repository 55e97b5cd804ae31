"""GenerationConfig: every decoding knob in one frozen, validated dataclass.

Names and meanings follow transformers' `GenerationConfig` where both have the knob
(`max_new_tokens`, `do_sample`, `top_k`, `num_beams`, `length_penalty`, `early_stopping`,
`bad_words_ids`, ...), so a setting carries over unchanged. Checks that need the model
(vocabulary size, position limit) or the prompts live in `check_against_model` and
`check_prompts`, called by the generator before any work starts.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Sequence, Union

EarlyStopping = Union[bool, str]   # True | False | "never", as in transformers
COMPILE_MODES = ("xla", "graph", "eager")   # how the decode functions run (generation/batch.py)
WEIGHT_FORMATS = ("float32", "bfloat16", "int8")   # dense kernels while generating (generation/weights.py)
BATCHING_MODES = ("continuous", "static")   # how the server admits requests (serving/scheduler.py)


def round_up(value: int, multiple: int) -> int:
    """`value` rounded up to a multiple of `multiple` (prompt buckets, cache lengths)."""
    return -(-value // multiple) * multiple


def prompt_buckets(max_prompt_tokens: int, multiple: int, cache_length: int) -> list[int]:
    """The prompt lengths a slot scheduler compiles a prefill for: multiples of `multiple` up to
    the longest prompt rounded up, below the cache length (serving.scheduler, and the server's
    memory estimate)."""
    return [p for p in range(multiple, round_up(max_prompt_tokens, multiple) + 1, multiple) if p < cache_length]


class GenerationConfigError(ValueError):
    """A decoding setting or a prompt that cannot be generated from."""


def _flag(help: str, metavar: str | None = None, **extra) -> dict:
    """Field metadata that makes a field a decoding flag of the CLIs (generation/flags.py)."""
    return {"flag": dict(help=help, metavar=metavar, **extra)}


EARLY_STOPPING_CHOICES = {"false": False, "true": True, "never": "never"}


@dataclass(frozen=True)
class GenerationConfig:
    """Defaults live here only; the CLI flags (generation/flags.py) are derived from the fields
    whose metadata carries a "flag"."""
    max_new_tokens: int = field(default=32, metadata=_flag("at most N new tokens per prompt", "N"))
    min_new_tokens: int = field(default=0, metadata=_flag(
        "stop tokens are suppressed before this many new tokens", "N"))
    do_sample: bool = field(default=False, metadata=_flag(
        "sample instead of greedy decoding (with --num-beams > 1: beam sampling)"))
    temperature: float = field(default=1.0, metadata=_flag("sampling temperature (> 0)", "T"))
    top_k: int = field(default=0, metadata=_flag(
        "sample from the k most likely tokens (0: off; transformers defaults to 50)", "K"))
    top_p: float = field(default=1.0, metadata=_flag("nucleus sampling mass in (0, 1] (1: off)", "P"))
    repetition_penalty: float = field(default=1.0, metadata=_flag(
        "> 1 discourages tokens already present (1: off)", "R"))
    num_beams: int = field(default=1, metadata=_flag("beam search with this many beams (1: off)", "K"))
    num_return_sequences: int = field(default=1, metadata=_flag(
        "completions per prompt: N independent samples (--do-sample) or the N best beams", "N"))
    length_penalty: float = field(default=1.0, metadata=_flag(
        "beam score = sum of log-probabilities / new_tokens ** length_penalty", "A"))
    early_stopping: EarlyStopping = field(default=False, metadata=_flag(
        "beam search stopping rule, as in transformers (docs/generation.md)", choices=EARLY_STOPPING_CHOICES))
    stop_token_ids: tuple[int, ...] = ()    # e.g. the tokenizer's EOS id
    stop_strings: tuple[str, ...] = ()      # greedy/sampling only: needs a tokenizer
    bad_words_ids: tuple[tuple[int, ...], ...] = ()   # token sequences never generated
    seed: int = field(default=0, metadata=_flag(
        "sampling seed: same seed, same tokens (a prompts file's 'seed' field overrides it)", "S"))
    pad_token_id: int = 0                   # fed to rows that already finished (never returned)

    def __post_init__(self):
        # Accept lists from callers and keep the object hashable (it keys compiled functions).
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        object.__setattr__(self, "stop_strings", tuple(self.stop_strings))
        object.__setattr__(self, "bad_words_ids", tuple(tuple(int(t) for t in w) for w in self.bad_words_ids))
        self._validate()

    def replace(self, **changes) -> "GenerationConfig":
        return dataclasses.replace(self, **changes)

    @property
    def effective_bad_words(self) -> tuple[tuple[int, ...], ...]:
        """bad_words_ids without one-token words that are stop tokens: as in transformers, a
        stop token is never banned this way (that would forbid ending; use min_new_tokens)."""
        return tuple(w for w in self.bad_words_ids if not (len(w) == 1 and w[0] in self.stop_token_ids))

    @property
    def candidates_per_beam(self) -> int:
        """Beam search keeps this many continuations per beam each step (and sampling filters
        keep at least this many tokens per beam), so that num_beams continuations are still
        open even if the best ones all stop, as in transformers."""
        return max(2, 1 + len(self.stop_token_ids))

    @property
    def strategy(self) -> str:
        """"greedy", "sample", "beam" or "beam_sample"."""
        if self.num_beams > 1:
            return "beam_sample" if self.do_sample else "beam"
        return "sample" if self.do_sample else "greedy"

    def _validate(self) -> None:
        _require(isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1,
                 f"max_new_tokens={self.max_new_tokens} must be a positive integer")
        _require(isinstance(self.min_new_tokens, int) and 0 <= self.min_new_tokens <= self.max_new_tokens,
                 f"min_new_tokens={self.min_new_tokens} must be between 0 and max_new_tokens="
                 f"{self.max_new_tokens}")
        _require(isinstance(self.num_beams, int) and self.num_beams >= 1,
                 f"num_beams={self.num_beams} must be an integer >= 1 (1 = no beam search)")
        _require(isinstance(self.num_return_sequences, int) and self.num_return_sequences >= 1,
                 f"num_return_sequences={self.num_return_sequences} must be an integer >= 1")
        if self.num_return_sequences > 1:
            _require(self.num_beams > 1 or self.do_sample,
                     f"num_return_sequences={self.num_return_sequences} with greedy decoding would repeat "
                     "one answer; sample (do_sample) or use beam search (num_beams > 1)")
            _require(self.num_return_sequences <= self.num_beams or self.num_beams == 1,
                     f"num_return_sequences={self.num_return_sequences} must be <= num_beams={self.num_beams}: "
                     "beam search returns its best finished hypotheses")
        _require(self.top_k >= 0, f"top_k={self.top_k} must be >= 0 (0 turns the top-k filter off)")
        _require(0.0 < self.top_p <= 1.0, f"top_p={self.top_p} must be in (0, 1] (1 turns the filter off)")
        _require(self.repetition_penalty > 0.0,
                 f"repetition_penalty={self.repetition_penalty} must be > 0 (1.0 = no penalty)")
        if self.do_sample:
            _require(self.temperature > 0.0,
                     f"temperature={self.temperature} must be > 0 when sampling; for the most likely "
                     "token use greedy decoding (do_sample=False)")
        _require(self.early_stopping in (True, False, "never"),
                 f"early_stopping={self.early_stopping!r} must be true, false or 'never'")
        _require(all(t >= 0 for t in self.stop_token_ids),
                 f"stop_token_ids={list(self.stop_token_ids)} must be non-negative token ids")
        _require(all(isinstance(s, str) and s for s in self.stop_strings),
                 f"stop_strings={list(self.stop_strings)} must be non-empty strings")
        _require(not (self.stop_strings and self.num_beams > 1),
                 "stop strings work with greedy decoding and sampling, not beam search; give stop "
                 "token ids instead (stop_token_ids)")
        for word in self.bad_words_ids:
            _require(len(word) > 0 and all(t >= 0 for t in word),
                     f"bad_words_ids entry {list(word)} must be a non-empty list of token ids")
        _require(self.pad_token_id >= 0, f"pad_token_id={self.pad_token_id} must be a token id")

    def check_against_model(self, vocab_size: int) -> None:
        """Every token id the config names exists in the model's vocabulary."""
        def check(ids: Sequence[int], what: str) -> None:
            outside = [t for t in ids if t >= vocab_size]
            if outside:
                raise GenerationConfigError(f"{what} {outside[0]} is outside the model vocabulary "
                                            f"(model.vocab_size={vocab_size}); use ids below {vocab_size}")
        check(self.stop_token_ids, "stop token id")
        check([t for w in self.bad_words_ids for t in w], "bad_words_ids token id")
        check([self.pad_token_id], "pad_token_id")

    def check_prompts(self, prompts: Sequence[Sequence[int]], max_positions: int, vocab_size: int) -> None:
        """Prompts are non-empty, use known ids, and leave room for max_new_tokens positions."""
        _require(len(prompts) > 0, "no prompts to generate from; give at least one")
        limit = max_positions - self.max_new_tokens
        for i, prompt in enumerate(prompts):
            _require(len(prompt) > 0, f"prompt {i} is empty; give at least one token")
            _require(limit > 0,
                     f"max_new_tokens={self.max_new_tokens} leaves no position for the prompt: "
                     f"model.max_position_embeddings={max_positions} holds prompt and new tokens together; "
                     f"ask for at most {max_positions - 1} new tokens (fewer with longer prompts)")
            _require(len(prompt) <= limit,
                     f"prompt {i} has {len(prompt)} tokens but model.max_position_embeddings="
                     f"{max_positions} leaves room for at most {limit} with max_new_tokens="
                     f"{self.max_new_tokens}; shorten the prompt or ask for fewer new tokens")
            outside = [t for t in prompt if not 0 <= t < vocab_size]
            if outside:
                raise GenerationConfigError(f"prompt {i} holds token id {outside[0]} outside the model "
                                            f"vocabulary (model.vocab_size={vocab_size})")


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise GenerationConfigError(message)
