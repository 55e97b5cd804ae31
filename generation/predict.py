"""`run.py --mode predict`: the prompts file, the batches, and the JSONL it writes
(its flags are in generation/flags.py).

Results are appended to the output file one complete JSON line per completion, flushed as
soon as its batch finishes: a long run shows progress in the file, an interrupted one
keeps what it finished, and earlier runs' lines stay (the file is a log of predictions).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, TextIO

from generation.config import GenerationConfig, round_up
from generation.flags import config_from_flags
from input.tokenizer import GptTokenizer, load_tokenizer
from config.params import ModelParams
from runtime.peak_memory import Decoding, Estimate, generation_estimate

if TYPE_CHECKING:      # TensorFlow is imported where a model runs: run.py checks memory before that
    from generation.text import Completion
    from generation.weights import GenerationModel
    from model import GPTJModel

LENGTH_MULTIPLE = 32   # prompt slots and cache lengths are rounded up to this (fewer compiled shapes)


class PredictError(ValueError):
    """Predict mode was asked for something it cannot do."""


class PromptsFileError(PredictError):
    """A prompts file that cannot be read as prompts."""


@dataclass(frozen=True)
class PromptRequest:
    text: str
    seed: int | None = None


def read_prompts(prompt: str | None, prompts_file: str | None) -> list[PromptRequest]:
    """The prompts of `--prompt` or `--prompts-file` (exactly one of them)."""
    if (prompt is None) == (prompts_file is None):
        raise PromptsFileError("give exactly one of --prompt and --prompts-file")
    if prompt is not None:
        return [PromptRequest(prompt)]
    if not os.path.isfile(prompts_file):
        raise FileNotFoundError(f"prompts file {prompts_file} does not exist; pass --prompts-file")
    with open(prompts_file, encoding="utf-8") as f:
        lines = f.read().splitlines()
    numbered = [(n, line) for n, line in enumerate(lines, 1) if line.strip()]
    if not numbered:
        raise PromptsFileError(f"prompts file {prompts_file} holds no prompt")
    if prompts_file.endswith(".jsonl") or numbered[0][1].lstrip().startswith("{"):
        return [_json_request(prompts_file, n, line) for n, line in numbered]
    return [PromptRequest(line) for _, line in numbered]


def _json_request(path: str, number: int, line: str) -> PromptRequest:
    where = f"{path}:{number}"
    try:
        item = json.loads(line)
    except json.JSONDecodeError as err:
        raise PromptsFileError(f"{where} is not JSON ({err.msg}); write one object per line such as "
                               '{"prompt": "text"}') from None
    if not isinstance(item, dict) or not isinstance(item.get("prompt"), str):
        raise PromptsFileError(f'{where} has no "prompt" string; write {{"prompt": "text"}}')
    seed = item.get("seed")
    if seed is not None and not isinstance(seed, int):
        raise PromptsFileError(f'{where}: "seed" must be an integer, got {seed!r}')
    return PromptRequest(item["prompt"], seed)


@dataclass(frozen=True)
class PredictJob:
    """Everything predict mode needs besides the model, validated."""
    tokenizer: GptTokenizer
    requests: list[PromptRequest]
    config: GenerationConfig
    batch_size: int
    compile_mode: str
    weight_format: str = "float32"
    longest_prompt: int = 1           # tokens of the longest prompt


def prepare(args: argparse.Namespace, model_config: ModelParams) -> PredictJob:
    """run.py's predict flags -> a checked job: the tokenizer fits the model, every prompt is
    readable, non-empty and short enough, every decoding setting is valid."""
    if (args.prompt is None and args.prompts_file is None) or not args.tokenizer:
        raise PredictError("--mode predict needs --prompt and --tokenizer (or --prompts-file instead of --prompt)")
    tokenizer = load_tokenizer(args.tokenizer)
    tokenizer.check_fits_model(model_config.vocab_size)
    requests = read_prompts(args.prompt, args.prompts_file)
    config = config_from_flags(args, tokenizer)
    longest = check_requests(requests, tokenizer, config, model_config)
    return PredictJob(tokenizer, requests, config, args.batch_size, args.generation_compile, args.weight_format,
                      longest)


def memory_estimate(job: PredictJob, model_config: ModelParams) -> Estimate:
    """The peak memory of running `job` (runtime/peak_memory.py): its weight format, and one
    batch's cache: prompts x beams (or samples) rows, as long as the longest prompt and the new
    tokens, each rounded up as the Generator rounds them."""
    config = job.config
    prompts = min(job.batch_size, len(job.requests))
    beams = config.num_beams > 1
    per_prompt = config.num_beams if beams else config.num_return_sequences
    prompt_slots = round_up(job.longest_prompt, LENGTH_MULTIPLE)
    cache_length = round_up(prompt_slots + config.max_new_tokens, LENGTH_MULTIPLE)

    def decoding(count: int) -> Decoding:          # beams expand after the prefill; samples are rows from the start
        return Decoding(count * per_prompt, cache_length, prompt_slots, count * (1 if beams else per_prompt),
                        reorders=beams)
    return generation_estimate("run.py --mode predict", model_config, job.weight_format, decoding, prompts,
                               job.compile_mode, loader="direct", compile_flag="--generation-compile",
                               slots_flag="--batch-size")


def run_job(model: GPTJModel | GenerationModel, job: PredictJob, output_path: str) -> list[Completion]:
    """Complete the job's prompts with `model`, loaded in job.weight_format (generation/loading.py)."""
    done = predict(model, job.tokenizer, job.requests, job.config, output_path, job.batch_size, job.compile_mode)
    # stderr: stdout carries the completions themselves and may be piped
    print(f"{len(done)} completion(s) appended to {output_path}", file=sys.stderr)
    return done


def check_requests(requests: list[PromptRequest], tokenizer: GptTokenizer, config: GenerationConfig,
                   model_config: ModelParams) -> int:
    """Every prompt and token id fits the model, checked before any work (errors name the
    prompt's index in the file); returns the longest prompt's token count."""
    config.check_against_model(model_config.vocab_size)
    prompts = tokenizer.encode_batch([r.text for r in requests])
    config.check_prompts(prompts, model_config.max_position_embeddings, model_config.vocab_size)
    return max(len(p) for p in prompts)


def predict(model: GPTJModel | GenerationModel, tokenizer: GptTokenizer, requests: list[PromptRequest], config: GenerationConfig,
            output_path: str, batch_size: int = 8, compile_mode: str = "xla",
            console: TextIO | None = None) -> list[Completion]:
    """Complete every request in batches, appending one JSON line per completion to output_path.
    A single prompt asking for one sequence is streamed to the console as it is generated
    (greedy and sampling); otherwise each finished completion is printed as one JSON line."""
    from generation.generator import Generator
    from generation.text import complete
    console = console or sys.stdout          # looked up per call: tests and tools swap sys.stdout
    check_requests(requests, tokenizer, config, model.config)
    generator = Generator(model, compile_mode=compile_mode, length_multiple=LENGTH_MULTIPLE)
    stream = len(requests) == 1 and config.num_beams == 1 and config.num_return_sequences == 1
    batch_size = min(batch_size, len(requests))
    directory = os.path.dirname(os.path.abspath(output_path))
    os.makedirs(directory, exist_ok=True)
    done: list[Completion] = []
    with open(output_path, "a", encoding="utf-8") as out:
        for start in range(0, len(requests), batch_size):
            chunk = requests[start:start + batch_size]
            # A short last batch is filled with copies of its last prompt so the decoder compiled
            # for the full batch serves it (rows are independent; the copies are dropped).
            filled = chunk + [chunk[-1]] * (batch_size - len(chunk))
            seeds = [config.seed if r.seed is None else r.seed for r in filled]
            on_text: Callable[[str], None] | None = _console_writer(console) if stream else None
            completions = complete(generator, tokenizer, [r.text for r in filled], config, seeds,
                                   on_text)[:len(chunk) * config.num_return_sequences]
            for completion in completions:
                out.write(json.dumps(completion.record(), ensure_ascii=False) + "\n")
                if not stream:
                    shown = {"prompt": completion.prompt, "completion": completion.completion}
                    if completion.sequence is not None:
                        shown["sequence"] = completion.sequence
                    console.write(json.dumps(shown, ensure_ascii=False) + "\n")
            out.flush()
            done.extend(completions)
    if stream:
        console.write("\n")
    return done


def _console_writer(console: TextIO) -> Callable[[str], None]:
    def write(text: str) -> None:
        console.write(text)
        console.flush()
    return write
