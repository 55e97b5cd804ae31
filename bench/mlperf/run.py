"""MLPerf Inference GPT-J on LoadGen: Offline or Server, performance or accuracy, over the
generator in this process or over the HTTP server.

    python -m bench.mlperf.run --scenario Offline|Server --mode performance|accuracy --sut generator|http \
        (--tokenizer TOK --dataset cnn_eval.json (--params P (--model-dir M | --checkpoint-path C)
         | --hf-checkpoint HF | --sut http --url http://127.0.0.1:8000) | --tiny)
        [--count N] [--user-conf bench/mlperf/user.conf] [--output-dir mlperf_logs] [--batch-size 1]
        [--http-concurrency 8] [--compile xla] [--weight-format int8]

Prompts: the Alpaca template over each article, GPT-J tokens cut to 1,919; decoding: 4 beams,
early stopping, 30 to 128 new tokens (bench/mlperf/dataset.py). LoadGen's settings come from
its built-in mlperf.conf, then --user-conf. `--sut http` without --url starts the server in
this process on loopback. --tiny builds a random tiny GPT-J, a tokenizer and a small local
CNN/DailyMail-format set in --output-dir (no download). Accuracy mode then scores
mlperf_log_accuracy.json (bench/mlperf/accuracy.py).
"""
from __future__ import annotations

import os
import re
import sys
import time

from config.quiet import add_verbose_flag, quiet_tensorflow

if __name__ == "__main__":      # before the imports below load TensorFlow (--verbose shows its start-up lines)
    quiet_tensorflow("--verbose" in sys.argv[1:])

from config.cli import ArgumentParser
from generation.flags import add_hf_checkpoint_flag, add_weight_format_flag
from runtime.preflight import add_skip_flag

HERE = os.path.dirname(os.path.abspath(__file__))
MODEL_NAME = "gptj"                    # the model's key in mlperf.conf / user.conf
SERVER_P99_TARGET_S = 20.0             # MLPerf GPT-J Server scenario latency bound at the 99th percentile
TINY_SAMPLES = 8


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="python -m bench.mlperf.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenario", choices=("Offline", "Server"), required=True,
                        help="Offline: every sample at once; Server: samples arriving as a Poisson process")
    parser.add_argument("--mode", choices=("performance", "accuracy"), default="performance",
                        help="performance: LoadGen's timing summary; accuracy: every sample once, then ROUGE")
    parser.add_argument("--sut", choices=("generator", "http"), default="generator",
                        help="generator: generation.Generator in this process; http: POST /v1/completions")
    parser.add_argument("--params", default=None,
                        help="params YAML of the model to load here (not with --tiny or --sut http --url; "
                             "optional with --hf-checkpoint)")
    parser.add_argument("--model-dir", default=None, help="run directory: its latest checkpoint")
    parser.add_argument("--checkpoint-path", default=None, help="a checkpoint prefix or converted model directory")
    add_hf_checkpoint_flag(parser)
    add_weight_format_flag(parser)
    parser.add_argument("--dtype", default=None, help="compute dtype: float32, bfloat16, float16")
    parser.add_argument("--tokenizer", default=None, help="GPT-J's tokenizer: directory/file or hub id")
    parser.add_argument("--dataset", default=None, help="MLPerf's cnn_eval.json (13,368 samples)")
    parser.add_argument("--count", type=int, default=None,
                        help=f"use the first N samples (default: all; --tiny: {TINY_SAMPLES})")
    parser.add_argument("--tiny", action="store_true",
                        help="a random tiny GPT-J, tokenizer and local data set built in --output-dir")
    parser.add_argument("--user-conf", default=None,
                        help="LoadGen settings over mlperf.conf (default: bench/mlperf/user.conf; --tiny: user_tiny.conf)")
    parser.add_argument("--output-dir", default="mlperf_logs", help="LoadGen's logs and summary")
    parser.add_argument("--batch-size", type=int, default=1, help="generator SUT: samples generated together")
    parser.add_argument("--url", default=None, help="http SUT: a running serving.server (default: start one)")
    parser.add_argument("--http-concurrency", type=int, default=8, help="http SUT: requests in flight")
    parser.add_argument("--compile", choices=("xla", "graph", "eager"), default="xla",
                        help="how generation runs: XLA (fastest), graph, or eager")
    add_skip_flag(parser)
    add_verbose_flag(parser)
    return parser


def memory_estimate(model_config, args):
    """The peak memory of the model in this process (runtime/peak_memory.py): MLPerf's 4 beams
    per sample over prompts of up to 1,919 tokens and 128 new ones, --batch-size samples at a
    time (generator SUT) or one request in the local server's slot beside its beam search."""
    from bench.mlperf.dataset import MAX_INPUT_TOKENS, generation_config
    from generation.batch import round_up
    from runtime.peak_memory import Decoding, generation_estimate
    config = generation_config(0)
    prompt_slots = round_up(MAX_INPUT_TOKENS, 32)               # the Generator's default length multiple
    length = round_up(prompt_slots + config.max_new_tokens, 32)
    generator = args.sut == "generator"

    def decoding(count: int) -> Decoding:
        return Decoding(count * config.num_beams, length, prompt_slots, prefill_rows=count,
                        slot_rows=0 if generator else 1)
    return generation_estimate("bench.mlperf.run", model_config, args.weight_format, decoding,
                               args.batch_size if generator else 1, args.compile, loader="direct",
                               slots_flag="--batch-size" if generator else None)


def tiny_setup(work: str, count: int):
    """(model, tokenizer, dataset path) of a random tiny GPT-J over a made-up local set."""
    from bench.mlperf.dataset import local_samples, sample_texts, write_local_set
    from config.params import ModelParams
    from input.scripts.train_tokenizer import train_tokenizer
    from model import GPTJModel
    os.makedirs(work, exist_ok=True)
    dataset = os.path.join(work, "cnn_eval_local.json")
    write_local_set(dataset, count)
    tokenizer = train_tokenizer(sample_texts(local_samples(count)), os.path.join(work, "tokenizer"), vocab_size=400)
    # 2,048 positions as GPT-J has, so that 1,919 prompt + 128 new tokens fit.
    config = ModelParams(vocab_size=tokenizer.vocab_size, hidden_size=64, num_hidden_layers=2, num_heads=4,
                         rotary_dim=8, filter_size=128, max_position_embeddings=2048)
    return GPTJModel(config, seed=0), tokenizer, dataset


def test_settings(args, lg):
    settings = lg.TestSettings()
    if args.user_conf is None:
        args.user_conf = os.path.join(HERE, "user_tiny.conf" if args.tiny else "user.conf")
    if not os.path.exists(args.user_conf):
        raise FileNotFoundError(f"--user-conf {args.user_conf} does not exist")
    # LoadGen reads its built-in mlperf.conf only on a process's first conf_type=1 call; loading it
    # explicitly (conf_type 0) first gives every run in one process the same settings.
    settings.FromConfig(args.user_conf, MODEL_NAME, args.scenario, 0)
    settings.FromConfig(args.user_conf, MODEL_NAME, args.scenario, 1)
    settings.scenario = getattr(lg.TestScenario, args.scenario)
    settings.mode = lg.TestMode.AccuracyOnly if args.mode == "accuracy" else lg.TestMode.PerformanceOnly
    return settings


def summary_p99_seconds(summary: str) -> float | None:
    found = re.search(r"99\.00 percentile latency \(ns\)\s*:\s*(\d+)", summary)
    return int(found.group(1)) / 1e9 if found else None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    remote = args.sut == "http" and args.url is not None        # the server holds the model
    local = args.params is not None or args.hf_checkpoint is not None
    if args.tiny and (local or remote):
        print("error: --tiny builds its own model and server; drop --params, --hf-checkpoint and --url",
              file=sys.stderr)
        return 2
    if not args.tiny and (args.tokenizer is None or args.dataset is None or local == remote):
        print("error: give --tiny, or --tokenizer and --dataset with either --params and --model-dir/"
              "--checkpoint-path or --hf-checkpoint (the model in this process) or --sut http --url "
              "(a running server)", file=sys.stderr)
        return 2
    import mlperf_loadgen as lg

    from bench.mlperf import accuracy
    from bench.mlperf.dataset import generation_config, load_samples, prompt_ids
    from bench.mlperf.sut import GeneratorSUT, HttpSUT
    from config.params import ParamsError
    from generation.generator import Generator
    os.makedirs(args.output_dir, exist_ok=True)
    try:
        if args.tiny:
            from generation.weights import generation_model
            model, tokenizer, dataset = tiny_setup(args.output_dir, args.count or TINY_SAMPLES)
            model = generation_model(model, args.weight_format)
        else:
            from input.tokenizer import load_tokenizer
            tokenizer, dataset, model = load_tokenizer(args.tokenizer), args.dataset, None
            if not remote:
                from runtime import preflight
                from serving.loading import load_serving_model

                def check_memory(params):
                    preflight.check(memory_estimate(params.model, args), args.skip_memory_check)
                _, model = load_serving_model(args.params, args.model_dir, args.checkpoint_path, args.dtype,
                                              args.weight_format, args.hf_checkpoint, check=check_memory)
                tokenizer.check_fits_model(model.config.vocab_size)
        samples = load_samples(dataset, args.count)
        settings = test_settings(args, lg)
    except (ParamsError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    config = generation_config(tokenizer.eos_id)
    prompts = [prompt_ids(tokenizer, s) for s in samples]
    print(f"{len(samples)} samples from {dataset}; prompts {min(map(len, prompts))}-{max(map(len, prompts))} tokens; "
          f"{args.scenario}, {args.mode}, {args.sut} SUT", flush=True)

    uv = server = None
    if args.sut == "generator":
        sut = GeneratorSUT(Generator(model, args.compile), config, prompts, args.batch_size)
    else:
        url = args.url
        if url is None:
            from bench.serve import serve_in_thread
            from serving.server import Limits, build_server
            limits = Limits(max_prompt_tokens=max(map(len, prompts)), max_tokens=config.max_new_tokens,
                            max_beams=config.num_beams, request_timeout=3600)
            # one beam group's slots: a query at a time, as the Generator SUT at --batch-size 1
            server = build_server(model, tokenizer, slots=config.num_beams, limits=limits,
                                  max_queue=args.http_concurrency, compile_mode=args.compile)
            uv, thread, url = serve_in_thread(server)
        sut = HttpSUT(url, config, prompts, args.http_concurrency)
    # mlperf.conf's GPT-J sets 13,368 performance samples; a smaller set (--count, --tiny) has fewer.
    performance_samples = min(len(prompts), settings.performance_sample_count_override or len(prompts))
    settings.performance_sample_count_override = performance_samples
    qsl = lg.ConstructQSL(len(prompts), performance_samples, lambda indices: None,
                          lambda indices: None)                           # prompts are tokenized up front
    log_settings = lg.LogSettings()
    log_settings.log_output.outdir = os.path.abspath(args.output_dir)
    log_settings.log_output.copy_summary_to_stdout = True
    start = time.perf_counter()
    try:
        lg.StartTestWithLogSettings(sut.handle, qsl, settings, log_settings)
    finally:
        sut.close()
        lg.DestroyQSL(qsl)
        if uv is not None:
            uv.should_exit = True
            thread.join(60)
            server.scheduler.stop(60)
    print(f"LoadGen run took {time.perf_counter() - start:.1f} s; logs in {args.output_dir}", flush=True)
    if sut.errors:
        print(f"error: {len(sut.errors)} sample(s) failed; first: {sut.errors[0]}", file=sys.stderr)
        return 1
    if args.mode == "accuracy":
        print("\n".join(accuracy.evaluate(args.output_dir, dataset, tokenizer)))
    else:
        with open(os.path.join(args.output_dir, "mlperf_log_summary.txt"), encoding="utf-8") as f:
            p99 = summary_p99_seconds(f.read())
        if args.scenario == "Server" and p99 is not None:
            verdict = "meets" if p99 <= SERVER_P99_TARGET_S else "above"
            print(f"Server p99 latency {p99:.2f} s   target <= {SERVER_P99_TARGET_S:.0f} s: {verdict}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
