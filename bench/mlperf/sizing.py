"""What a harness run at the 6B shape needs before it starts: the memory of the model in this
process (runtime/peak_memory.py's estimate, for the memory preflight) and a prompt bucket
whose padded caches fit the model's positions. Free of TensorFlow: checked before it loads."""
from __future__ import annotations

import dataclasses
from typing import Sequence

from bench.mlperf.dataset import generation_config
from generation.config import round_up

MLPERF = generation_config(0)          # 4 beams, up to 128 new tokens


def prompt_shapes(prompt_lengths: Sequence[int], bucket: int) -> int:
    """Distinct padded prompt lengths: the generator compiles (and keeps) one decoder per shape."""
    return len({round_up(n, bucket) for n in prompt_lengths})


def memory_estimate(model_config, args, prompt_lengths):
    """The peak memory of the model in this process (runtime/peak_memory.py): MLPerf's 4 beams
    per sample over these prompts and 128 new tokens, --batch-size samples at a time (generator
    SUT) or one request in the local server's slot beside its beam search. The generator keeps
    the compiled prefill and decode of every padded prompt length it meets (--prompt-bucket):
    each beyond the first is counted at the measured size of a prefill program (the decode's
    assumed alike). Fixes offered besides generation_estimate's (formats, --batch-size): a
    bfloat16 cache (--dtype bfloat16, half the bytes of float32 compute's), int8 weights with
    it, and --prompt-bucket 128 (fewer shapes)."""
    from runtime.peak_memory import Decoding, generation_estimate
    generator = args.sut == "generator"

    def estimate(model, weight_format=args.weight_format, bucket=args.prompt_bucket if generator else 32):
        prompt_slots = round_up(max(prompt_lengths), bucket)
        length = round_up(prompt_slots + MLPERF.max_new_tokens, bucket)
        shapes = prompt_shapes(prompt_lengths, bucket) if generator else 1

        def decoding(count: int) -> Decoding:
            return Decoding(count * MLPERF.num_beams, length, prompt_slots, prefill_rows=count,
                            slot_rows=0 if generator else 1, prefill_programs=2 * shapes - 1, reorders=generator)
        return generation_estimate("bench.mlperf.run", model, weight_format, decoding,
                                   args.batch_size if generator else 1, args.compile, loader="direct",
                                   slots_flag="--batch-size" if generator else None)
    found = estimate(model_config)
    fixes = []
    if not model_config.mixed_precision and args.weight_format != "bfloat16":
        bfloat16_cache = dataclasses.replace(model_config, mixed_precision=True, mixed_precision_dtype="bfloat16")
        fixes.append(("--dtype bfloat16", estimate(bfloat16_cache).total))
        if args.weight_format == "float32":
            fixes.append(("--weight-format int8 --dtype bfloat16", estimate(bfloat16_cache, "int8").total))
    if generator and args.prompt_bucket < 128:
        fixes.append(("--prompt-bucket 128", estimate(model_config, bucket=128).total))
    lower = tuple(fix for fix in fixes if fix[1] < found.total)
    return dataclasses.replace(found, fixes=found.fixes + lower)


def check_prompt_bucket(bucket: int, prompts, max_positions: int, new_tokens: int) -> None:
    """The Generator pads prompts and caches to multiples of the bucket: the longest prompt's cache
    must stay within the model's positions."""
    cache = round_up(round_up(max(map(len, prompts)), bucket) + new_tokens, bucket)
    if cache > max_positions:
        fits = [b for b in (128, 64, 32) if round_up(round_up(max(map(len, prompts)), b) + new_tokens, b)
                <= max_positions]
        raise ValueError(f"--prompt-bucket {bucket} pads the longest prompt's cache to {cache} slots, past the "
                         f"model's {max_positions} positions; use --prompt-bucket {fits[0] if fits else 1}")
