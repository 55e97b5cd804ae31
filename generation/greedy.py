"""The one-prompt greedy call demo.py uses, kept as a small wrapper over Generator."""
from __future__ import annotations

from generation.config import GenerationConfig
from generation.generator import Generator
from model import GPTJModel


def greedy_generate(model: GPTJModel, prompt_ids: list[int], max_new_tokens: int,
                    stop_id: int | None = None, compile_mode: str = "xla") -> tuple[list[int], str]:
    """(new token ids, finish reason "stop" | "length") continuing `prompt_ids` greedily; a
    final stop token is included in the ids."""
    config = GenerationConfig(max_new_tokens=max_new_tokens,
                              stop_token_ids=() if stop_id is None else (stop_id,),
                              pad_token_id=0 if stop_id is None else stop_id)
    result = Generator(model, compile_mode).generate([prompt_ids], config)[0]
    return result.token_ids, result.finish_reason
