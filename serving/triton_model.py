"""The `gptj` model that serving.triton binds into Triton: KServe v2 request tensors in,
generation.Generator calls, response tensors out. No Triton import: `GptjInference` is a plain
callable on a list of requests (mappings of input name to array), as PyTriton hands them over.

Every tensor's first dimension is the request's rows (Triton's batch dimension), so a request
may carry several prompts; the dynamic batcher joins requests into one call. Rows that share
their decoding settings are decoded together in one Generator call (left-padded, a seed per
row); rows with other settings run in further calls.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from generation.config import GenerationConfig, GenerationConfigError

DEFAULTS = GenerationConfig()
PAD_ID = -1         # fills token_ids after a row's last token


@dataclass(frozen=True)
class TensorSpec:
    """One input or output of the model; shape excludes the batch dimension (-1: any length)."""
    name: str
    dtype: type
    shape: tuple[int, ...]
    optional: bool = False
    help: str = ""


INPUTS = (
    TensorSpec("text", np.bytes_, (1,), True, "the prompt as UTF-8 text (give text or token_ids)"),
    TensorSpec("token_ids", np.int32, (-1,), True, "the prompt as token ids (give text or token_ids)"),
    TensorSpec("max_tokens", np.int32, (1,), True, f"new tokens at most (absent: {DEFAULTS.max_new_tokens}, or --max-tokens-limit if lower)"),
    TensorSpec("temperature", np.float32, (1,), True, "0 or absent: greedy; > 0: sample at this temperature"),
    TensorSpec("top_k", np.int32, (1,), True, "sample from the k most likely tokens (0 or absent: off)"),
    TensorSpec("top_p", np.float32, (1,), True, "nucleus sampling mass in (0, 1] (absent: 1, off)"),
    TensorSpec("seed", np.int64, (1,), True, f"sampling seed (default {DEFAULTS.seed}): same seed, same tokens"),
    TensorSpec("num_beams", np.int32, (1,), True, "beam search with this many beams (absent: 1, off)"),
)
OUTPUTS = (
    TensorSpec("token_ids", np.int32, (-1,), help=f"new tokens, the final EOS dropped; {PAD_ID} after a row's end"),
    TensorSpec("text", np.bytes_, (1,), help="the new tokens' text, UTF-8"),
)
SETTINGS = tuple(spec for spec in INPUTS if spec.name not in ("text", "token_ids"))


@dataclass(frozen=True)
class Limits:
    """What one request may ask for (bounds the compiled shapes and the cache memory)."""
    max_prompt_tokens: int = 512
    max_tokens: int = 256
    max_beams: int = 4


class RequestError(ValueError):
    """A request the model cannot serve; the message names the input (and the flag of a limit)."""


@dataclass(frozen=True)
class Row:
    prompt: tuple[int, ...]
    config: GenerationConfig
    seed: int


class GptjInference:
    """Callable bound into Triton: list of requests -> list of {output name: array}."""

    def __init__(self, generator, tokenizer, limits: Limits = Limits()):
        self.generator, self.tokenizer, self.limits = generator, tokenizer, limits
        model_config = generator.model.config
        self.vocab_size, self.max_positions = model_config.vocab_size, model_config.max_position_embeddings

    def __call__(self, requests: Sequence[Mapping[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
        from generation.text import strip_stop_token      # loads TensorFlow: serving.triton --help stays fast
        parsed = [self.rows(request, i) for i, request in enumerate(requests)]
        groups: dict[GenerationConfig, list[tuple[int, int]]] = {}
        for r, rows in enumerate(parsed):
            for k, row in enumerate(rows):
                groups.setdefault(row.config, []).append((r, k))
        tokens: list[list[list[int] | None]] = [[None] * len(rows) for rows in parsed]
        for config, members in groups.items():
            rows = [parsed[r][k] for r, k in members]
            results = self.generator.generate([row.prompt for row in rows], config, seeds=[row.seed for row in rows])
            for (r, k), result in zip(members, results):
                tokens[r][k] = strip_stop_token(list(result.token_ids), config.stop_token_ids)   # as serving.server
        return [self.response(rows) for rows in tokens]

    def response(self, rows: list[list[int]]) -> dict[str, np.ndarray]:
        width = max(len(ids) for ids in rows)
        token_ids = np.full([len(rows), width], PAD_ID, np.int32)
        for i, ids in enumerate(rows):
            token_ids[i, :len(ids)] = ids
        # object, not np.bytes_: a fixed-width bytes array would drop a text's trailing NUL characters
        text = np.array([[self.tokenizer.decode(ids, skip_unknown=True).encode("utf-8")] for ids in rows],
                        dtype=object)
        return {"token_ids": token_ids, "text": text}

    # ---- request -> rows -----------------------------------------------------------------------

    def rows(self, request: Mapping[str, np.ndarray], index: int) -> list[Row]:
        """The request's rows, each with its prompt ids, GenerationConfig and seed."""
        try:
            prompts = self.prompts(request)
            settings = [{spec.name: scalar(request, spec, len(prompts), i) for spec in SETTINGS if spec.name in request}
                        for i in range(len(prompts))]
            return [self.row(prompt, values) for prompt, values in zip(prompts, settings)]
        except (RequestError, GenerationConfigError) as err:
            raise RequestError(f"request {index} of this batch: {err}") from None

    def prompts(self, request: Mapping[str, np.ndarray]) -> list[list[int]]:
        if ("text" in request) == ("token_ids" in request):
            raise RequestError("give the prompt as exactly one of the inputs text (BYTES [1]) and token_ids (INT32 [n])")
        if "text" in request:
            texts = np.asarray(request["text"]).reshape(-1)
            prompts = [self.tokenizer.encode(decode_utf8(t)) for t in texts]
            if any(not p for p in prompts):
                raise RequestError("input text is empty; give some text")
        else:
            ids = np.asarray(request["token_ids"])
            if ids.ndim != 2 or ids.shape[1] == 0:
                raise RequestError(f"input token_ids has shape {list(ids.shape)}; give [rows, n] with n >= 1 ids")
            prompts = [[int(t) for t in row] for row in ids]
        longest = max(len(p) for p in prompts)
        if longest > self.limits.max_prompt_tokens:
            raise RequestError(f"the prompt has {longest} tokens; this server takes at most "
                               f"{self.limits.max_prompt_tokens} (--max-prompt-tokens)")
        return prompts

    def row(self, prompt: list[int], values: dict) -> Row:
        limits = self.limits
        max_tokens = int(values.get("max_tokens", min(DEFAULTS.max_new_tokens, limits.max_tokens)))
        if max_tokens > limits.max_tokens:
            raise RequestError(f"input max_tokens={max_tokens} exceeds this server's limit {limits.max_tokens} "
                               "(--max-tokens-limit)")
        num_beams = int(values.get("num_beams", DEFAULTS.num_beams))
        if num_beams > limits.max_beams:
            raise RequestError(f"input num_beams={num_beams} exceeds this server's limit {limits.max_beams} "
                               "(--max-beams)")
        temperature = float(values.get("temperature", 0.0))
        if temperature < 0:
            raise RequestError(f"input temperature={temperature} must be >= 0 (0: greedy)")
        eos = self.tokenizer.eos_id
        config = GenerationConfig(
            max_new_tokens=max_tokens, do_sample=temperature > 0,
            temperature=temperature if temperature > 0 else DEFAULTS.temperature,
            top_k=int(values.get("top_k", DEFAULTS.top_k)), top_p=float(values.get("top_p", DEFAULTS.top_p)),
            num_beams=num_beams, early_stopping=num_beams > 1, stop_token_ids=(eos,), pad_token_id=eos)
        config.check_against_model(self.vocab_size)
        config.check_prompts([prompt], self.max_positions, self.vocab_size)
        seed = int(values.get("seed", DEFAULTS.seed))
        # the seed only matters when sampling: greedy and beam rows of any seed share a call
        return Row(tuple(prompt), config, seed if config.do_sample else DEFAULTS.seed)


def scalar(request: Mapping[str, np.ndarray], spec: TensorSpec, rows: int, row: int):
    """Row `row`'s value of a [rows, 1] setting input."""
    value = np.asarray(request[spec.name])
    if value.shape != (rows, 1):
        raise RequestError(f"input {spec.name} has shape {list(value.shape)}; give [{rows}, 1], "
                           "one value per prompt row")
    return value[row, 0].item()


def decode_utf8(value) -> str:
    try:
        return value.decode("utf-8") if isinstance(value, bytes) else str(value)
    except UnicodeDecodeError as err:
        raise RequestError(f"input text is not UTF-8 ({err.reason} at byte {err.start})") from None

