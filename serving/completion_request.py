"""What a completions request may ask, and its check against the server's limits.

    body = CompletionRequest(**json)             # types and unknown fields (pydantic: a 400 naming the field)
    prompts = request_prompts(body, tokenizer, limits)                       # token ids per prompt
    config = request_config(body, prompts, tokenizer, limits, vocab_size, max_positions)

Every refusal is a RequestError naming the field (`error.param`) and what to change. Free of
TensorFlow: `python -m serving.server --help` imports this.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt

from generation.config import GenerationConfig, GenerationConfigError
from input.tokenizer import GptTokenizer

Number = Union[StrictInt, StrictFloat]


class CompletionRequest(BaseModel):
    """The OpenAI completions request, plus num_beams, repetition_penalty, bad_words, min_tokens
    and ignore_eos. A list of prompts is answered by n choices per prompt, in order."""
    model_config = ConfigDict(extra="forbid")
    model: Optional[str] = None
    prompt: Union[str, list[StrictInt], list[str], list[list[StrictInt]]]
    max_tokens: StrictInt = Field(16, ge=0)
    temperature: Number = Field(1.0, ge=0)
    top_p: Number = Field(1.0, gt=0, le=1)
    top_k: StrictInt = Field(0, ge=0)
    n: StrictInt = Field(1, ge=1)
    stop: Union[str, list[str], None] = None
    seed: Optional[StrictInt] = None
    stream: StrictBool = False
    logprobs: Optional[StrictInt] = Field(None, ge=0)
    echo: StrictBool = False
    num_beams: StrictInt = Field(1, ge=1)
    repetition_penalty: Number = Field(1.0, gt=0)
    bad_words: list[str] = []
    min_tokens: StrictInt = Field(0, ge=0)
    ignore_eos: StrictBool = False


# Union-typed fields, whose validator messages name the union's branches rather than the field.
FIELD_HINTS = {"prompt": "must be a string, a list of integer token ids, or a list of either (one completion "
                         "per prompt)",
               "stop": "must be a string or a list of up to 4 strings"}


@dataclass(frozen=True)
class Limits:
    max_prompt_tokens: int = 512
    max_tokens: int = 256
    max_n: int = 4
    max_beams: int = 4
    request_timeout: float = 60.0
    prompt_bucket: int = 32          # prompts are left-padded to a multiple: one compiled prefill each
    max_logprobs: int = 5            # largest `logprobs` (top-n per token); OpenAI's own cap


class RequestError(ValueError):
    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.param, self.status, self.kind = param, status, kind


def error_response(message: str, param: str | None, status: int, kind: str = "invalid_request_error"):
    return JSONResponse({"error": {"message": message, "type": kind, "param": param}}, status_code=status)


def given_prompts(body: CompletionRequest) -> list[str | list[int]]:
    """The prompts as given: one for a string or a list of ids, several for a list of either."""
    given = body.prompt
    batch = isinstance(given, list) and bool(given) and not isinstance(given[0], int)
    return list(given) if batch else [given]


def request_prompts(body: CompletionRequest, tokenizer: GptTokenizer, limits: Limits) -> list[list[int]]:
    """The token ids of each prompt, each non-empty and within --max-prompt-tokens."""
    prompts = given_prompts(body)
    batch = len(prompts) > 1 or prompts[0] is not body.prompt
    ids = []
    for prompt in prompts:
        where = "prompt" if not batch else f"prompt[{len(ids)}]"
        if isinstance(prompt, str):
            if not prompt:
                raise RequestError(f"{where} is empty; give some text or token ids", "prompt")
            ids.append(tokenizer.encode(prompt))
        else:
            if not prompt:
                raise RequestError(f"{where} is an empty list; give at least one token id", "prompt")
            ids.append(list(prompt))
        if len(ids[-1]) > limits.max_prompt_tokens:
            raise RequestError(f"{where} has {len(ids[-1])} tokens; this server takes at most "
                               f"{limits.max_prompt_tokens} (--max-prompt-tokens)", "prompt")
    return ids


def request_config(body: CompletionRequest, prompts: list[list[int]], tokenizer: GptTokenizer, limits: Limits,
                   vocab_size: int, max_positions: int) -> GenerationConfig:
    """The GenerationConfig of every prompt of the request. With max_tokens=0 (echo only, nothing
    generated) it is checked as if for one token."""
    if body.max_tokens > limits.max_tokens:
        raise RequestError(f"max_tokens={body.max_tokens} exceeds this server's limit {limits.max_tokens}",
                           "max_tokens")
    if body.max_tokens == 0 and not body.echo:
        raise RequestError("max_tokens=0 generates nothing: it is for echo=true (the prompt and, with logprobs, "
                           "its scores); otherwise give max_tokens >= 1", "max_tokens")
    if body.logprobs is not None and body.logprobs > limits.max_logprobs:
        raise RequestError(f"logprobs={body.logprobs} exceeds this server's limit {limits.max_logprobs} "
                           "(--max-logprobs)", "logprobs")
    if body.logprobs is not None and body.stream:
        raise RequestError("logprobs come from a scoring pass after generation ends, so they do not stream; "
                           "set stream=false or leave logprobs out", "logprobs")
    if body.n > limits.max_n:
        raise RequestError(f"n={body.n} exceeds this server's limit {limits.max_n}", "n")
    if body.num_beams > limits.max_beams:
        raise RequestError(f"num_beams={body.num_beams} exceeds this server's limit {limits.max_beams}",
                           "num_beams")
    if body.stream and body.num_beams > 1:
        raise RequestError("beam search knows its answer only at the end; set stream=false or num_beams=1",
                           "stream")
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stops) > 4 or any(not s for s in stops):
        raise RequestError("stop takes up to 4 non-empty strings", "stop")
    bad_words = [tokenizer.encode(w) for w in body.bad_words]
    if any(not w for w in bad_words):
        raise RequestError("bad_words holds an empty string", "bad_words")
    eos = tokenizer.eos_id
    max_new_tokens = max(body.max_tokens, 1)
    try:
        config = GenerationConfig(
            max_new_tokens=max_new_tokens, min_new_tokens=min(body.min_tokens, max_new_tokens),
            do_sample=body.temperature > 0, temperature=float(body.temperature) if body.temperature > 0 else 1.0,
            top_k=body.top_k, top_p=float(body.top_p), repetition_penalty=float(body.repetition_penalty),
            num_beams=body.num_beams, num_return_sequences=body.n,
            stop_token_ids=() if body.ignore_eos else (eos,), stop_strings=tuple(stops),
            bad_words_ids=tuple(tuple(w) for w in bad_words), pad_token_id=eos,
            early_stopping=True if body.num_beams > 1 else False)
        config.check_against_model(vocab_size)
        config.check_prompts(prompts, max_positions, vocab_size)
    except GenerationConfigError as err:
        raise RequestError(str(err), None) from None
    return config
