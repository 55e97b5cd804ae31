"""Benchmark: decoding in each generation weight format (float32, bfloat16, int8) against our
float32 decode, with each format's quality measured against float32 on the same prompts.

    python -m bench.generate_formats [--formats float32,bfloat16,int8] [--batches 1,8]
                                     [--hidden 512] [--layers 8] [--vocab 50400]
                                     [--quality-model-dir demo_work/model] [--quality-prompts 16]

Speed: the random GPT-J shape of bench.generate, greedy, no stop token; decode tokens/s
after the first token, best of --repeats (formats interleaved). Target: int8 decode at batch
1 >= 1.5x our float32.

Quality: on a trained model (the `make demo` model when it exists, else the random one,
whose near-uniform logits make agreement a harsh test), for each prompt the float32 greedy
continuation is the reference; each format reports
  top-1     teacher-forced: the share of positions whose argmax equals float32's
  greedy    the share of new tokens produced before the format's greedy continuation first
            departs from float32's (1.0: the same text)
  logit err max and mean |logit - float32 logit| over prompt and continuation, and their
            ratio to the float32 logits' standard deviation
"""
from __future__ import annotations

import os
import time

from bench.shapes import add_shape_flags
from config.cli import ArgumentParser
from config.quiet import add_verbose_flag, quiet_tensorflow

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def random_model(args):
    from config.params import ModelParams
    from model import GPTJModel
    config = ModelParams(vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
                         num_heads=args.heads, rotary_dim=args.rotary_dim, filter_size=4 * args.hidden,
                         max_position_embeddings=2048)
    return GPTJModel(config, seed=0)


def decode_seconds(model, prompts, new_tokens: int) -> tuple[float, float]:
    """(ttft, total) of one greedy generation through the compiled decoder."""
    import tensorflow as tf

    from bench.generate import prepared_decoder
    from generation.config import GenerationConfig
    from generation.generator import Generator
    config = GenerationConfig(max_new_tokens=new_tokens, pad_token_id=0)
    generator = decode_seconds.generators.setdefault(id(model), Generator(model, "xla"))
    decoder, state = prepared_decoder(generator, prompts, config)
    start = time.perf_counter()
    state = decoder.prefill(state)
    state.tokens.numpy()
    first = time.perf_counter()
    state = decoder.advance(state, tf.constant(new_tokens))
    decoder.row_tokens(state)
    return first - start, time.perf_counter() - start


decode_seconds.generators = {}


def bench_speed(args, base, formats: list[str]) -> None:
    import numpy as np

    from generation.weights import generation_model, tree_bytes
    models = {name: generation_model(base, name) for name in formats}
    rng = np.random.default_rng(0)
    print(f"\nspeed: GPT-J d={args.hidden} layers={args.layers} vocab={args.vocab}, prompt {args.prompt} tokens, "
          f"{args.new} new, greedy, XLA")
    print(f"{'batch':>5} {'format':>9} {'weights':>10} {'ttft':>9} {'decode':>11} {'vs float32':>10}")
    for batch in [int(b) for b in args.batches.split(",")]:
        prompts = rng.integers(1, args.vocab, size=(batch, args.prompt)).tolist()
        for model in models.values():
            decode_seconds(model, prompts, args.new)                     # compile
        best = {name: (0.0, 0.0) for name in models}
        for _ in range(args.repeats):
            for name, model in models.items():
                ttft, total = decode_seconds(model, prompts, args.new)
                rate = batch * (args.new - 1) / (total - ttft)
                if rate > best[name][1]:
                    best[name] = (ttft, rate)
        for name, model in models.items():
            size = tree_bytes(model.weights if name != "float32" else base.weights_tree())
            ratio = best[name][1] / best["float32"][1] if "float32" in best else float("nan")
            print(f"{batch:>5} {name:>9} {size / 2**20:>7.0f}MiB {best[name][0] * 1e3:>7.1f}ms "
                  f"{best[name][1]:>7.1f} t/s {ratio:>9.2f}x")


def quality_model(args):
    """(model, prompts as token ids, description): the demo model on standard-library text, or the random one."""
    import numpy as np
    if args.quality_model_dir and os.path.isdir(args.quality_model_dir):
        from checkpoint_utils.load import load_model
        from config.params import load_params
        from input.tokenizer import load_tokenizer
        params = load_params(os.path.join(args.quality_model_dir, "params.yaml"))
        model = load_model(params.model, args.quality_model_dir)
        tokenizer = load_tokenizer(args.quality_tokenizer)
        text = open(os.path.join(os.path.dirname(os.__file__), "textwrap.py"), encoding="utf-8").read()
        ids = tokenizer.encode(text)
        starts = np.linspace(0, len(ids) - args.prompt - 1, args.quality_prompts).astype(int)
        return model, [ids[s:s + args.prompt] for s in starts], f"{args.quality_model_dir} on textwrap.py"
    rng = np.random.default_rng(1)
    model = random_model(args)
    return model, rng.integers(1, args.vocab, size=(args.quality_prompts, args.prompt)).tolist(), "the random model"


def bench_quality(args, formats: list[str]) -> None:
    import numpy as np
    import tensorflow as tf

    from generation.config import GenerationConfig
    from generation.generator import Generator
    from generation.weights import generation_model
    base, prompts, described = quality_model(args)
    config = GenerationConfig(max_new_tokens=args.quality_new, pad_token_id=0)
    reference = [r.token_ids for r in Generator(base, "xla").generate(prompts, config)]
    sequences = tf.constant([p + r for p, r in zip(prompts, reference)])                      # [n, P + new]
    ref_logits = base(sequences).logits.numpy()
    spread = ref_logits.std()
    print(f"\nquality against float32: {described}, {len(prompts)} prompts of {args.prompt} tokens, "
          f"{args.quality_new} greedy tokens each")
    print(f"{'format':>9} {'top-1':>7} {'greedy':>7} {'same text':>9} {'max err':>9} {'mean err':>9} "
          f"{'mean/std':>8}")
    for name in formats:
        if name == "float32":
            continue
        model = generation_model(base, name)
        logits = model(sequences).logits.numpy()
        top1 = (logits.argmax(-1) == ref_logits.argmax(-1)).mean()
        outputs = [r.token_ids for r in Generator(model, "xla").generate(prompts, config)]
        kept = [next((i for i, (a, b) in enumerate(zip(o, r)) if a != b), len(r)) / len(r)
                for o, r in zip(outputs, reference)]
        error = np.abs(logits - ref_logits)
        print(f"{name:>9} {top1:>7.1%} {np.mean(kept):>7.1%} {sum(k == 1.0 for k in kept):>5}/{len(kept):<3} "
              f"{error.max():>9.4f} {error.mean():>9.5f} {error.mean() / spread:>8.4f}")


def main(argv: list[str] | None = None) -> int:
    from generation.config import WEIGHT_FORMATS
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--formats", default=",".join(WEIGHT_FORMATS), help="comma-separated weight formats")
    add_shape_flags(parser, rotary_dim=32)
    parser.add_argument("--prompt", type=int, default=64, help="prompt tokens")
    parser.add_argument("--new", type=int, default=64, help="new tokens per prompt (speed)")
    parser.add_argument("--batches", default="1,8", help="comma-separated batch sizes (speed)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per case (the best is kept)")
    parser.add_argument("--quality-model-dir", default="demo_work/model",
                        help="trained run directory for the quality table (missing: the random model)")
    parser.add_argument("--quality-tokenizer", default="demo_work/tokenizer", help="its tokenizer")
    parser.add_argument("--quality-prompts", type=int, default=16, help="prompts for the quality table")
    parser.add_argument("--quality-new", type=int, default=32, help="greedy tokens per prompt (quality)")
    add_verbose_flag(parser)
    args = parser.parse_args(argv)
    formats = [f for f in args.formats.split(",") if f]
    unknown = sorted(set(formats) - set(WEIGHT_FORMATS))
    if unknown:
        parser.error(f"--formats: unknown {', '.join(unknown)}; use {', '.join(WEIGHT_FORMATS)}")
    quiet_tensorflow(args.verbose)
    from bench.machine import describe_machine
    print(describe_machine())
    bench_speed(args, random_model(args), formats)
    bench_quality(args, formats)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
