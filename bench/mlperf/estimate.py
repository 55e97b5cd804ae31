"""How long a GPT-J-6B run of the harness takes on the project's 2-core machine, from measured rates.

Measured by `python -m bench.real_size` at the full 6B shape (docs/generation.md, 2026-12-06,
AMD EPYC, 2 cores, 24 GiB; float32 compute for both formats) and by serving.server (README):

    prefill            14.2 tok/s (int8), 14.3 (bfloat16), 1,919-token prompt
    4-beam decode      0.35 steps/s (int8), 0.37 (bfloat16), 256-token prompt (cache 384 slots);
                       0.35x transformers' bfloat16 (0.99 steps/s). Greedy batch 1: 0.48 tok/s (2.06 s/step)
    compile            ~47 s for a new prompt shape (prefill + decode: the server's first request
                       took 74 s, the same request compiled 27 s)
    load               48 s into int8 or bfloat16 from the bfloat16 checkpoint

One sample of prompt length P (padded to the Generator's bucket) costs P / prefill rate plus
N new tokens x a beam step. A beam step measured with a 384-slot cache gets slower with a
longer one: each step reads every beam's cache in attention and copies it when the beams are
reordered (a gather: read + write), 3 passes over 4 rows x 2 x 28 layers x L x 4,096 values, at
the machine's measured copy bandwidth (26.7 GB/s). N is 128 (max_new_tokens) unless known: a
random-weight model rarely picks EOS, so its beams run to the end; a trained GPT-J's summaries
stop earlier (MLPerf's reference: ~300 characters, ~70 tokens). Only the 6B shape on this kind
of machine is covered; other shapes get no estimate rather than a guessed one.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from bench.mlperf.dataset import generation_config
from generation.config import round_up

LOAD_S = 48.0
COMPILE_S = 47.0
COPY_BANDWIDTH = 26.7e9          # bytes/s, NumPy copy on this machine (docs/generation.md)
MEASURED_CACHE_SLOTS = 384       # round_up(256 + 128, 32): the beam measurement's cache
MLPERF = generation_config(0)          # 4 beams, up to 128 new tokens
SHAPE = {"hidden_size": 4096, "num_hidden_layers": 28}       # what the rates were measured at


@dataclass(frozen=True)
class Rates:
    prefill_tokens_per_s: float
    beam_steps_per_s: float      # at MEASURED_CACHE_SLOTS


MEASURED = {"int8": Rates(14.2, 0.35), "bfloat16": Rates(14.3, 0.37)}


@dataclass(frozen=True)
class Estimate:
    samples: int
    shapes: int                  # distinct (prompt slots, cache length) pairs: one compilation each
    prefill_s: float
    decode_s: float
    compile_s: float
    load_s: float
    sample_s: tuple[float, ...]  # each sample alone: prefill + decode (its latency on an idle SUT)

    @property
    def total_s(self) -> float:
        return self.load_s + self.compile_s + self.prefill_s + self.decode_s

    @property
    def samples_per_s(self) -> float:
        return self.samples / (self.prefill_s + self.decode_s)


def cache_bytes(cache_slots: int, value_bytes: int, layers: int = 28, hidden: int = 4096) -> float:
    """Keys and values of the 4 beams over `cache_slots` positions."""
    return MLPERF.num_beams * 2 * layers * cache_slots * hidden * value_bytes


def beam_step_s(rates: Rates, cache_slots: int, value_bytes: int) -> float:
    """One 4-beam step with a `cache_slots` cache: the measured step plus 3 passes over the extra cache."""
    extra = cache_bytes(cache_slots, value_bytes) - cache_bytes(MEASURED_CACHE_SLOTS, value_bytes)
    return 1.0 / rates.beam_steps_per_s + 3 * extra / COPY_BANDWIDTH


def offline_estimate(prompt_lengths: Sequence[int], weight_format: str, bucket: int = 32,
                     new_tokens: int = MLPERF.max_new_tokens, value_bytes: int = 4, loaded: bool = False) -> Estimate:
    """The run's wall time, one sample at a time (batch 1 is what was measured), each prompt length
    in `prompt_lengths` once (repeats included: LoadGen may issue a sample twice). value_bytes:
    the cache dtype's (float32 compute: 4; bfloat16: 2). loaded: the model is in memory already."""
    rates = MEASURED[weight_format]
    shapes, prefill, decode, each = set(), 0.0, 0.0, []
    for length in prompt_lengths:
        slots = round_up(length, bucket)
        cache = round_up(slots + new_tokens, bucket)
        shapes.add((slots, cache))
        p = slots / rates.prefill_tokens_per_s
        d = new_tokens * beam_step_s(rates, cache, value_bytes)
        prefill, decode = prefill + p, decode + d
        each.append(p + d)
    return Estimate(len(prompt_lengths), len(shapes), prefill, decode, COMPILE_S * len(shapes),
                    0.0 if loaded else LOAD_S, tuple(each))


def covered(model_config, weight_format: str) -> str | None:
    """None when the rates apply to this model and format, else why not."""
    shape = {key: getattr(model_config, key) for key in SHAPE}
    if shape != SHAPE:
        return f"the rates were measured at GPT-J-6B's shape (hidden 4096, 28 layers), not {shape}"
    if weight_format not in MEASURED:
        return f"no measured rates for --weight-format {weight_format} (int8 and bfloat16 were measured)"
    return None


def minutes(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 5400 else f"{seconds / 60:.0f} min"


def describe(estimate: Estimate, bound_s: float | None = None) -> list[str]:
    """Lines for the harness's start: the total and its parts; with a Server latency bound, whether
    one sample alone already exceeds it."""
    lines = [f"estimated wall time on the measured 2-core machine: ~{minutes(estimate.total_s)} for "
             f"{estimate.samples} samples (load {estimate.load_s:.0f} s, {estimate.shapes} prompt shape(s) to "
             f"compile {estimate.compile_s:.0f} s, prefill {minutes(estimate.prefill_s)}, 4-beam decode "
             f"{minutes(estimate.decode_s)}); ~{estimate.samples_per_s:.4f} samples/s"]
    if bound_s is not None and estimate.sample_s:
        fastest = min(estimate.sample_s)
        if fastest > bound_s:
            lines.append(f"a sample alone takes ~{fastest:.0f} s here, above the Server bound of {bound_s:.0f} s: "
                         "no target QPS can meet it on this machine (the run still measures it)")
    return lines
