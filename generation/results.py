"""What a generation returns for one prompt."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Generation:
    token_ids: list[int]              # new tokens; a final stop token is included, as transformers does
    finish_reason: str                # "stop" (stop token or stop string) | "length" (max_new_tokens)
    stop: int | str | None = None     # the stop token id or stop string that ended it
    score: float | None = None        # beam search: sum of log-probabilities / new_tokens ** length_penalty
