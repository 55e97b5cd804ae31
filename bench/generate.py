"""Benchmark: greedy decoding speed of generation/ vs transformers' PyTorch `generate`.

    python -m bench.generate [--hidden 512] [--layers 8] [--vocab 50400] [--prompt 64] [--new 64]
                             [--batches 1,8] [--repeats 3] [--compile xla|graph]
                             [--beams 4] [--beam-batch 2]

One random GPT-J is built with transformers, saved, converted with checkpoint_utils and
loaded into GPTJModel, so both sides run the same weights on this machine's CPU cores.
For each batch size, both decode the same random prompts greedily with no stop token, so
every run makes exactly --new tokens. Reported per side:

  ttft      time to first token: the prompt's forward pass and the first choice (ours: the
            prefill call; transformers: generate(max_new_tokens=1))
  decode    tokens/s after the first token: batch x (new - 1) / (total - ttft); ours decodes
            the batch in one compiled loop; "ours/token" syncs the host after every token
            (streaming, stop strings)

Beam search (--beams K, 0 skips it) is timed whole, prompt included, at --beam-batch
prompts: new tokens/s = prompts x new / seconds, with no stop token, so every beam runs to
--new tokens on both sides.

Each measurement is repeated (sides interleaved, so a noisy neighbour hurts both) and the
best repeat is kept. Target: decode >= 1.5x transformers.
"""
from __future__ import annotations

import os
import shutil
import statistics
import tempfile
import time

from config.quiet import add_verbose_flag, quiet_tensorflow
from bench.shapes import add_shape_flags
from config.cli import ArgumentParser

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def build_models(args, work: str):
    """The same random GPT-J as a transformers model and as our GPTJModel."""
    import torch
    import transformers

    from checkpoint_utils.convert_hf import convert
    from checkpoint_utils.load import load_model
    torch.manual_seed(0)
    config = transformers.GPTJConfig(vocab_size=args.vocab, n_embd=args.hidden, n_layer=args.layers,
                                     n_head=args.heads, rotary_dim=args.rotary_dim, n_inner=4 * args.hidden,
                                     n_positions=2048, bos_token_id=0, eos_token_id=0)
    hf_model = transformers.GPTJForCausalLM(config).eval()
    hf_model.generation_config.eos_token_id = None       # no stop token: every run makes --new tokens
    hf_model.save_pretrained(os.path.join(work, "hf"))
    params = convert(os.path.join(work, "hf"), os.path.join(work, "tf"), progress=False)
    return hf_model, load_model(params, os.path.join(work, "tf"))


def prepared_decoder(generator, prompts, config):
    """(the generator's compiled decoder for these prompts and config, its initial state), as
    Generator.generate builds them, so a bench can time prefill and advance on their own. Seeds
    are zero: greedy and beam search do not use them."""
    import numpy as np

    from generation.batch import left_pad, round_up
    batch = left_pad(prompts, config.pad_token_id, generator.length_multiple)
    cache_length = round_up(batch.prompt_slots + config.max_new_tokens, generator.length_multiple)
    decoder = generator.decoder(config, len(prompts), batch.prompt_slots, cache_length)
    return decoder, decoder.initial_state(batch, np.zeros([len(prompts)], np.int64))


def time_ours(generator, prompts, config) -> tuple[float, float, list[list[int]]]:
    """(ttft, total seconds, tokens) for one greedy generation, timed around the decoder calls."""
    import tensorflow as tf

    decoder, state = prepared_decoder(generator, prompts, config)
    start = time.perf_counter()
    state = decoder.prefill(state)
    state.tokens.numpy()
    first = time.perf_counter()
    state = decoder.advance(state, tf.constant(config.max_new_tokens))
    tokens = decoder.row_tokens(state)
    return first - start, time.perf_counter() - start, tokens


def time_ours_streaming(generator, prompts, config) -> tuple[float, float, list[list[int]]]:
    """(ttft, total seconds, tokens) when the host reads every token as it comes (what
    predict mode does for a single prompt): one advance call and one sync per token."""
    stamps = []
    start = time.perf_counter()
    results = generator.generate(prompts, config, on_tokens=lambda rows: stamps.append(time.perf_counter()))
    total = time.perf_counter() - start
    return stamps[0] - start, total, [r.token_ids for r in results]


def time_transformers(hf_model, prompts, new_tokens: int) -> tuple[float, float, list[list[int]]]:
    import torch
    ids = torch.tensor(prompts)
    mask = torch.ones_like(ids)
    with torch.no_grad():
        start = time.perf_counter()
        hf_model.generate(ids, attention_mask=mask, max_new_tokens=1, do_sample=False, pad_token_id=0)
        first = time.perf_counter() - start
        start = time.perf_counter()
        out = hf_model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                do_sample=False, pad_token_id=0)
        total = time.perf_counter() - start
    return first, total, out[:, ids.shape[1]:].tolist()


def time_beam_ours(generator, prompts, config) -> tuple[float, list[list[int]]]:
    start = time.perf_counter()
    results = generator.generate(prompts, config)
    return time.perf_counter() - start, [r.token_ids for r in results]


def time_beam_transformers(hf_model, prompts, new_tokens: int, beams: int) -> tuple[float, list[list[int]]]:
    import torch
    ids = torch.tensor(prompts)
    with torch.no_grad():
        start = time.perf_counter()
        out = hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                num_beams=beams, do_sample=False, early_stopping=False, pad_token_id=0)
        total = time.perf_counter() - start
    return total, out[:, ids.shape[1]:].tolist()


def bench_beam_search(args, generator, hf_model, rng) -> None:
    from generation.config import GenerationConfig
    prompts = rng.integers(1, args.vocab, size=(args.beam_batch, args.prompt)).tolist()
    config = GenerationConfig(max_new_tokens=args.new, num_beams=args.beams, pad_token_id=0)
    started = time.perf_counter()
    time_beam_ours(generator, prompts, config)                       # compile
    compile_seconds = time.perf_counter() - started
    time_beam_transformers(hf_model, prompts, 2, args.beams)          # warm up
    ours, theirs = [], []
    for _ in range(args.repeats):
        ours.append(time_beam_ours(generator, prompts, config))
        theirs.append(time_beam_transformers(hf_model, prompts, args.new, args.beams))
    best, best_hf = min(r[0] for r in ours), min(r[0] for r in theirs)
    same = sum(a == b for a, b in zip(ours[0][1], theirs[0][1]))
    tokens = args.beam_batch * args.new
    print(f"\nbeam search, {args.beams} beams, {args.beam_batch} prompts (whole generate, prompt included):")
    print(f"  ours {best:.2f}s = {tokens / best:.1f} t/s | transformers {best_hf:.2f}s = {tokens / best_hf:.1f} t/s"
          f" | {best_hf / best:.2f}x | same tokens {same}/{args.beam_batch} rows")
    print(f"  (compile {compile_seconds:.1f}s; seconds per repeat: ours {', '.join(f'{r[0]:.2f}' for r in ours)}"
          f"; hf {', '.join(f'{r[0]:.2f}' for r in theirs)})")


def decode_rate(batch: int, new_tokens: int, ttft: float, total: float) -> float:
    return batch * (new_tokens - 1) / (total - ttft)


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    add_shape_flags(parser, rotary_dim=32)
    parser.add_argument("--prompt", type=int, default=64, help="prompt tokens")
    parser.add_argument("--new", type=int, default=64, help="new tokens per prompt")
    parser.add_argument("--batches", default="1,8", help="comma-separated batch sizes")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per case (the median is reported)")
    parser.add_argument("--compile", default="xla", choices=("xla", "graph"), help="our compile mode")
    parser.add_argument("--beams", type=int, default=4, help="beam search with this many beams (0: skip)")
    parser.add_argument("--beam-batch", dest="beam_batch", type=int, default=2, help="prompts for beam search")
    add_verbose_flag(parser)
    args = parser.parse_args(argv)
    quiet_tensorflow(args.verbose)
    from bench.machine import describe_machine
    print(describe_machine())

    import numpy as np
    import torch

    from generation.config import GenerationConfig
    from generation.generator import Generator
    work = tempfile.mkdtemp(prefix="bench-generate-")
    try:
        hf_model, model = build_models(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    generator = Generator(model, compile_mode=args.compile)
    config = GenerationConfig(max_new_tokens=args.new, pad_token_id=0)
    print(f"GPT-J d={args.hidden} layers={args.layers} vocab={args.vocab}; prompt {args.prompt} tokens, "
          f"{args.new} new, greedy; torch threads {torch.get_num_threads()}; ours: {args.compile}")
    header = (f"{'batch':>5} | {'ttft ours':>9} {'ttft hf':>9} | {'decode ours':>11} {'ours/token':>11} "
              f"{'decode hf':>11} {'ratio':>6} | same tokens")
    print(header)
    print("-" * len(header))
    rng = np.random.default_rng(0)
    for batch in [int(b) for b in args.batches.split(",")]:
        prompts = rng.integers(1, args.vocab, size=(batch, args.prompt)).tolist()
        started = time.perf_counter()
        time_ours(generator, prompts, config)                        # compile (once per shape)
        compile_seconds = time.perf_counter() - started
        time_ours_streaming(generator, prompts, config)
        time_transformers(hf_model, prompts, 2)                       # warm up
        ours, streaming, theirs = [], [], []
        for _ in range(args.repeats):
            ours.append(time_ours(generator, prompts, config))
            streaming.append(time_ours_streaming(generator, prompts, config))
            theirs.append(time_transformers(hf_model, prompts, args.new))
        best_ours = max(ours, key=lambda r: decode_rate(batch, args.new, r[0], r[1]))
        best_hf = max(theirs, key=lambda r: decode_rate(batch, args.new, r[0], r[1]))
        rate_ours = decode_rate(batch, args.new, *best_ours[:2])
        rate_hf = decode_rate(batch, args.new, *best_hf[:2])
        rate_streaming = max(decode_rate(batch, args.new, *r[:2]) for r in streaming)
        same = sum(a == b for a, b in zip(best_ours[2], best_hf[2]))
        print(f"{batch:>5} | {min(r[0] for r in ours) * 1e3:>7.1f}ms {min(r[0] for r in theirs) * 1e3:>7.1f}ms | "
              f"{rate_ours:>7.1f} t/s {rate_streaming:>7.1f} t/s {rate_hf:>7.1f} t/s {rate_ours / rate_hf:>5.2f}x | "
              f"{same}/{batch} rows")
        spread = [decode_rate(batch, args.new, *r[:2]) for r in ours]
        spread_hf = [decode_rate(batch, args.new, *r[:2]) for r in theirs]
        print(f"      (compile {compile_seconds:.1f}s; decode t/s per repeat: ours "
              f"{', '.join(f'{x:.1f}' for x in spread)} [median {statistics.median(spread):.1f}], hf "
              f"{', '.join(f'{x:.1f}' for x in spread_hf)} [median {statistics.median(spread_hf):.1f}])")
    if args.beams > 1:
        bench_beam_search(args, generator, hf_model, rng)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
