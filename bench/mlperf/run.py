"""MLPerf Inference GPT-J on LoadGen: Offline or Server, performance or accuracy, over the
generator in this process or over the HTTP server.

    python -m bench.mlperf.run --scenario Offline|Server --mode performance|accuracy --sut generator|http \
        (--tokenizer TOK --dataset cnn_eval.json (--params P (--model-dir M | --checkpoint-path C)
         | --hf-checkpoint HF | --sut http --url http://127.0.0.1:8000) | --tiny)
        [--count N] [--user-conf bench/mlperf/user.conf] [--output-dir DIR] [--batch-size 1]
        [--http-concurrency 8] [--compile xla] [--weight-format int8] [--dtype bfloat16] [--prompt-bucket 32]
        [--queries N] [--target-qps Q] [--find-peak [--find-peak-rounds 5] [--offline-log DIR]]

Prompts: the Alpaca template over each article, GPT-J tokens cut to 1,919; decoding: 4 beams,
early stopping, 30 to 128 new tokens (bench/mlperf/dataset.py). LoadGen's settings come from
its built-in mlperf.conf, then --user-conf. `--sut http` without --url starts the server in
this process on loopback. --tiny builds a random tiny GPT-J, a tokenizer and a small local
CNN/DailyMail-format set in --output-dir (no download). Accuracy mode then scores
mlperf_log_accuracy.json (bench/mlperf/accuracy.py).

Each run keeps its own directory (--output-dir, default mlperf_logs/<scenario>-<mode>-<time>):
LoadGen's logs, command.txt and result.json (bench/mlperf/summary.py); an existing run's
directory is never overwritten. Before it loads a model the harness checks the memory it will
need (runtime/preflight.py) and prints the run's estimated wall time at GPT-J-6B's shape on the
measured 2-core machine (bench/mlperf/estimate.py). --queries N makes a short performance run;
--find-peak reruns the Server scenario at lower target QPS until its p99 latency meets the 20 s
bound (bench/mlperf/peak.py), one subdirectory per round.
"""
from __future__ import annotations

import math
import os
import sys
import time

from config.quiet import add_verbose_flag, quiet_tensorflow

if __name__ == "__main__":      # before the imports below load TensorFlow (--verbose shows its start-up lines)
    quiet_tensorflow("--verbose" in sys.argv[1:])

from config.cli import ArgumentParser
from generation.flags import add_weight_format_flag, add_weight_source_flags
from runtime.preflight import add_skip_flag

HERE = os.path.dirname(os.path.abspath(__file__))
MODEL_NAME = "gptj"                    # the model's key in mlperf.conf / user.conf
SERVER_P99_TARGET_S = 20.0             # MLPerf GPT-J Server scenario latency bound at the 99th percentile
TINY_SAMPLES = 8
MAX_POSITIONS = 2048                   # GPT-J's: a prompt bucket's cache must fit them


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="python -m bench.mlperf.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenario", choices=("Offline", "Server"), required=True,
                        help="Offline: every sample at once; Server: samples arriving as a Poisson process")
    parser.add_argument("--mode", choices=("performance", "accuracy"), default="performance",
                        help="performance: LoadGen's timing summary; accuracy: every sample once, then ROUGE")
    parser.add_argument("--sut", choices=("generator", "http"), default="generator",
                        help="generator: generation.Generator in this process; http: POST /v1/completions")
    add_weight_source_flags(parser, "loaded")        # the model in this process (not with --tiny or --url)
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
    parser.add_argument("--output-dir", default=None,
                        help="this run's directory: LoadGen's logs, command.txt, result.json (default "
                             "mlperf_logs/<scenario>-<mode>-<time>; must not hold an earlier run)")
    parser.add_argument("--batch-size", type=int, default=1, help="generator SUT: samples generated together")
    parser.add_argument("--prompt-bucket", type=int, default=32,
                        help="generator SUT: prompts are left-padded to a multiple of this; each distinct padded "
                             "length compiles (~47 s) and keeps its own programs at the 6B shape (~0.3 GB each), "
                             "so larger buckets mean fewer, with more padding to prefill")
    parser.add_argument("--queries", type=int, default=None,
                        help="performance mode: a short run of N queries (Offline: one query of at least N "
                             "samples and at least the loaded set, so --count limits it; Server: N arrivals), no "
                             "minimum duration: not a valid MLPerf result")
    parser.add_argument("--target-qps", type=float, default=None,
                        help="LoadGen's target QPS over --user-conf's (Server: the arrival rate; Offline: the "
                             "expected throughput, which sizes the run)")
    parser.add_argument("--find-peak", action="store_true",
                        help="Server, performance: rerun at lower target QPS until the p99 latency meets the "
                             f"{SERVER_P99_TARGET_S:.0f} s bound (start: --target-qps, else --offline-log's "
                             "samples/s, else --user-conf's)")
    parser.add_argument("--find-peak-rounds", type=int, default=5, help="--find-peak: at most this many runs")
    parser.add_argument("--offline-log", default=None,
                        help="--find-peak: an Offline performance run's directory; its samples/s is the first "
                             "target and the ceiling (a server cannot sustain more than that throughput)")
    parser.add_argument("--url", default=None, help="http SUT: a running serving.server (default: start one)")
    parser.add_argument("--http-concurrency", type=int, default=8, help="http SUT: requests in flight")
    parser.add_argument("--compile", choices=("xla", "graph", "eager"), default="xla",
                        help="how generation runs: XLA (fastest), graph, or eager")
    add_skip_flag(parser)
    add_verbose_flag(parser)
    return parser


class HarnessError(RuntimeError):
    """A LoadGen run whose samples failed (the SUT answered them empty)."""


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
                         rotary_dim=8, filter_size=128, max_position_embeddings=MAX_POSITIONS)
    return GPTJModel(config, seed=0), tokenizer, dataset


def argument_error(args) -> str | None:
    """Combinations the harness cannot run, each with its fix (None: fine)."""
    remote = args.sut == "http" and args.url is not None
    local = args.params is not None or args.hf_checkpoint is not None
    if args.tiny and (local or remote):
        return "--tiny builds its own model and server; drop --params, --hf-checkpoint and --url"
    if not args.tiny and (args.tokenizer is None or args.dataset is None or local == remote):
        return ("give --tiny, or --tokenizer and --dataset with either --params and --model-dir/--checkpoint-path "
                "or --hf-checkpoint (the model in this process) or --sut http --url (a running server)")
    if args.find_peak and (args.scenario != "Server" or args.mode != "performance"):
        return "--find-peak searches the Server scenario's QPS: use --scenario Server --mode performance"
    if args.offline_log is not None and not args.find_peak:
        return "--offline-log sets --find-peak's first target; add --find-peak, or give --target-qps alone"
    if args.queries is not None and (args.queries < 1 or args.mode != "performance"):
        return f"--queries {args.queries}: a positive number of queries, in --mode performance"
    if args.find_peak_rounds < 1:
        return f"--find-peak-rounds {args.find_peak_rounds} must be at least 1"
    if args.target_qps is not None and args.target_qps <= 0:
        return f"--target-qps {args.target_qps} must be positive"
    if args.prompt_bucket < 1:
        return f"--prompt-bucket {args.prompt_bucket} must be at least 1"
    return None


def run_directory(args) -> str:
    """This run's directory: --output-dir, or a new one named after the run; never an earlier run's."""
    from bench.mlperf.summary import SUMMARY
    directory = args.output_dir or os.path.join(
        "mlperf_logs", f"{args.scenario}-{args.mode}{'-find-peak' if args.find_peak else ''}-"
                       f"{time.strftime('%Y%m%d-%H%M%S')}")
    if os.path.exists(os.path.join(directory, SUMMARY)) or os.path.exists(os.path.join(directory, "find_peak.json")):
        raise FileExistsError(f"--output-dir {directory} holds an earlier run's logs; give a new directory (each run "
                              "keeps its own) or delete that one")
    return directory


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
    if args.target_qps is not None:
        set_target_qps(settings, args.scenario, args.target_qps)
    if args.queries is not None:             # a short run: exactly N queries, however long they take
        settings.min_query_count = settings.max_query_count = args.queries
        settings.min_duration_ms = 0
    return settings


def set_target_qps(settings, scenario: str, qps: float) -> None:
    if scenario == "Server":
        settings.server_target_qps = qps
    else:
        settings.offline_expected_qps = qps


def target_qps(settings, scenario: str) -> float:
    return settings.server_target_qps if scenario == "Server" else settings.offline_expected_qps


def issued_samples(settings, args, count: int) -> int:
    """About how many samples LoadGen will issue: every one once in accuracy mode; else enough for
    the minimum query count and the minimum duration at the target QPS."""
    if args.mode == "accuracy":
        return count
    qps = target_qps(settings, args.scenario)
    return max(settings.min_query_count, math.ceil(qps * settings.min_duration_ms / 1000))


def print_estimate(model_config, args, prompts, settings) -> None:
    """The run's estimated wall time (bench/mlperf/estimate.py), or why there is none."""
    from bench.mlperf import estimate
    from runtime.memory_model import cache_dtype_bytes
    why = estimate.covered(model_config, args.weight_format)
    if why is not None:
        print(f"no wall-time estimate: {why}", flush=True)
        return
    issued = issued_samples(settings, args, len(prompts))
    lengths = [len(prompts[i % len(prompts)]) for i in range(issued)]
    found = estimate.offline_estimate(lengths, args.weight_format, args.prompt_bucket if args.sut == "generator" else 32,
                                      value_bytes=cache_dtype_bytes(model_config, args.weight_format))
    bound = SERVER_P99_TARGET_S if args.scenario == "Server" else None
    lines = estimate.describe(found, bound)
    if args.scenario == "Server":
        lines.append(f"Server: {issued} arrivals at {target_qps(settings, 'Server'):g} QPS span "
                     f"~{estimate.minutes(issued / target_qps(settings, 'Server'))}; the run lasts the longer of that "
                     "and the samples' own time" + (f"; --find-peak: up to {args.find_peak_rounds} such runs"
                                                    if args.find_peak else ""))
    print("\n".join(lines), flush=True)


def load_model(args, tokenizer, prompts, settings):
    """The model from --params/--hf-checkpoint in its weight format, after the memory preflight and
    the wall-time estimate (both before TensorFlow loads)."""
    from bench.mlperf import sizing
    from runtime import preflight
    from serving.loading import load_serving_model

    def check_memory(params):
        preflight.check(sizing.memory_estimate(params.model, args, [len(p) for p in prompts]), args.skip_memory_check)
        print_estimate(params.model, args, prompts, settings)
    _, model = load_serving_model(args.params, args.model_dir, args.checkpoint_path, args.dtype,
                                  args.weight_format, args.hf_checkpoint, check=check_memory)
    tokenizer.check_fits_model(model.config.vocab_size)
    return model


def run_loadgen(lg, make_sut, prompts, settings, directory: str) -> float:
    """One LoadGen test into `directory`; its wall seconds. Raises HarnessError if samples failed."""
    os.makedirs(directory, exist_ok=True)
    sut = make_sut()
    # mlperf.conf's GPT-J sets 13,368 performance samples; a smaller set (--count, --tiny) has fewer.
    performance_samples = min(len(prompts), settings.performance_sample_count_override or len(prompts))
    settings.performance_sample_count_override = performance_samples
    qsl = lg.ConstructQSL(len(prompts), performance_samples, lambda indices: None,
                          lambda indices: None)                           # prompts are tokenized up front
    log_settings = lg.LogSettings()
    log_settings.log_output.outdir = os.path.abspath(directory)
    log_settings.log_output.copy_summary_to_stdout = True
    start = time.perf_counter()
    try:
        lg.StartTestWithLogSettings(sut.handle, qsl, settings, log_settings)
    finally:
        sut.close()
        lg.DestroyQSL(qsl)
    seconds = time.perf_counter() - start
    print(f"LoadGen run took {seconds:.1f} s; logs in {directory}", flush=True)
    if sut.errors:
        raise HarnessError(f"{len(sut.errors)} sample(s) failed; first: {sut.errors[0]}")
    return seconds


def find_peak_start(args, settings) -> tuple[float, float | None]:
    """(first target QPS, ceiling) of --find-peak: --target-qps, else the Offline run's samples/s
    (also the ceiling), else --user-conf's target."""
    from bench.mlperf.summary import load_summary
    ceiling = None
    if args.offline_log is not None:
        offline = load_summary(args.offline_log)
        if offline.scenario != "Offline" or offline.samples_per_s is None:
            raise ValueError(f"--offline-log {args.offline_log} is not an Offline performance run's directory")
        ceiling = offline.samples_per_s
    return args.target_qps or ceiling or target_qps(settings, "Server"), ceiling


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    problem = argument_error(args)
    if problem is not None:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    import mlperf_loadgen as lg

    from bench.mlperf import accuracy
    from bench.mlperf.dataset import generation_config, load_samples, prompt_ids
    from bench.mlperf.summary import describe, load_summary, write_record
    from config.params import ParamsError
    remote = args.sut == "http" and args.url is not None        # the server holds the model
    try:
        directory = run_directory(args)
        if args.tiny:
            from generation.weights import generation_model
            model, tokenizer, dataset = tiny_setup(directory, args.count or TINY_SAMPLES)
            model = generation_model(model, args.weight_format)
        else:
            from input.tokenizer import load_tokenizer
            tokenizer, dataset, model = load_tokenizer(args.tokenizer), args.dataset, None
        samples = load_samples(dataset, args.count)
        config = generation_config(tokenizer.eos_id)
        prompts = [prompt_ids(tokenizer, s) for s in samples]
        if args.sut == "generator":
            from bench.mlperf.sizing import check_prompt_bucket
            check_prompt_bucket(args.prompt_bucket, prompts, MAX_POSITIONS, config.max_new_tokens)
        settings = test_settings(args, lg)
        start_qps, ceiling = find_peak_start(args, settings) if args.find_peak else (None, None)
        print(f"{len(samples)} samples from {dataset}; prompts {min(map(len, prompts))}-{max(map(len, prompts))} "
              f"tokens; {args.scenario}, {args.mode}, {args.sut} SUT; run directory {directory}", flush=True)
        if args.tiny:
            print_estimate(model.config, args, prompts, settings)
        elif not remote:
            model = load_model(args, tokenizer, prompts, settings)
        else:
            print("no wall-time estimate: the model is in the server at --url", flush=True)
    except (ParamsError, FileNotFoundError, FileExistsError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    from bench.mlperf.sut import GeneratorSUT, HttpSUT
    uv = server = None
    if args.sut == "generator":
        from generation.generator import Generator
        generator = Generator(model, args.compile, length_multiple=args.prompt_bucket)

        def make_sut():
            return GeneratorSUT(generator, config, prompts, args.batch_size)
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

        def make_sut():
            return HttpSUT(url, config, prompts, args.http_concurrency)
    try:
        if args.find_peak:
            return find_peak_runs(args, argv, lg, make_sut, prompts, settings, directory, start_qps, ceiling)
        seconds = run_loadgen(lg, make_sut, prompts, settings, directory)
        summary = load_summary(directory)
        write_record(directory, argv, summary, wall_seconds=seconds, samples_in_set=len(prompts),
                     target_qps=target_qps(settings, args.scenario))
        print("\n".join(describe(summary)), flush=True)
        if args.mode == "accuracy":
            print("\n".join(accuracy.evaluate(directory, dataset, tokenizer)))
        elif args.scenario == "Server" and summary.p99_s is not None:
            verdict = "meets" if summary.p99_s <= SERVER_P99_TARGET_S else "above"
            print(f"Server p99 latency {summary.p99_s:.2f} s   target <= {SERVER_P99_TARGET_S:.0f} s: {verdict}")
        return 0
    except HarnessError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    finally:
        if uv is not None:
            uv.should_exit = True
            thread.join(60)
            server.scheduler.stop(60)


def find_peak_runs(args, argv, lg, make_sut, prompts, settings, directory: str, start_qps: float,
                   ceiling: float | None) -> int:
    """--find-peak: one LoadGen run per round in directory/round-NN-qps-Q, then find_peak.json."""
    import json

    from bench.mlperf.peak import Round, find_peak
    from bench.mlperf.summary import command_line, describe, load_summary, write_record
    from config.files import atomic_write_text

    rounds = 0

    def measure(qps: float) -> Round:
        nonlocal rounds
        rounds += 1
        set_target_qps(settings, "Server", qps)
        where = os.path.join(directory, f"round-{rounds:02d}-qps-{qps:.4g}")
        seconds = run_loadgen(lg, make_sut, prompts, settings, where)
        summary = load_summary(where)
        write_record(where, argv, summary, wall_seconds=seconds, samples_in_set=len(prompts), target_qps=qps)
        print("\n".join(describe(summary)), flush=True)
        return Round(qps, summary.p99_s, summary.min_latency_s, summary.result)

    peak = find_peak(measure, start_qps, SERVER_P99_TARGET_S, args.find_peak_rounds, ceiling)
    record = {"command": command_line(argv), "bound_s": SERVER_P99_TARGET_S, "ceiling_qps": ceiling,
              "rounds": [vars(r) for r in peak.rounds], "best": vars(peak.best) if peak.best else None,
              "reason": peak.reason}
    atomic_write_text(os.path.join(directory, "find_peak.json"), json.dumps(record, indent=1) + "\n")
    atomic_write_text(os.path.join(directory, "command.txt"), command_line(argv) + "\n")
    found = (f"highest target meeting p99 <= {SERVER_P99_TARGET_S:.0f} s: {peak.best.target_qps:.4g} QPS "
             f"(p99 {peak.best.p99_s:.2f} s)" if peak.best else f"no target met p99 <= {SERVER_P99_TARGET_S:.0f} s")
    print(f"find-peak: {found}; stopped: {peak.reason}; rounds in {directory}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
