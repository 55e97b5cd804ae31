"""Triton Inference Server: the model `gptj` served through PyTriton, Triton's dynamic batcher in
front of generation.Generator.

    python -m serving.triton --params P --model-dir M --tokenizer TOK [--http-port 8000 --grpc-port 8001
        --metrics-port 8002 --max-batch 8 --max-queue-delay-ms 5 --weight-format int8 ...]
    python -m serving.triton --hf-checkpoint HF_DIR --tokenizer HF_DIR --weight-format int8

KServe v2 over HTTP and gRPC: POST /v2/models/gptj/infer (inputs: serving/triton_model.py),
GET /v2/health/ready, Prometheus metrics on --metrics-port. Needs the `triton` extra and the
stub environment (`make test` installs both; docs/serving.md). SIGTERM or SIGINT stops Triton
and exits.
"""
from __future__ import annotations

import argparse
import signal
import socket
import sys
from pathlib import Path

from config.quiet import add_verbose_flag, quiet_tensorflow

if __name__ == "__main__":      # before the imports below load TensorFlow (--verbose shows its start-up lines)
    quiet_tensorflow("--verbose" in sys.argv[1:])

from config.cli import ArgumentParser, positive_int
from generation.config import COMPILE_MODES, round_up
from generation.flags import add_weight_format_flag, add_weight_source_flags
from runtime import preflight
from runtime.peak_memory import Decoding, Estimate, generation_estimate
from serving.triton_env import TritonEnvError, default_stub_env, prepare_pytriton
# serving.triton_model loads TensorFlow (through generation.text) and pytriton is optional: both
# are imported where used, so --help and argument errors return at once.

MODEL_NAME = "gptj"
LENGTH_MULTIPLE = 32        # the Generator's default: prompt slots and cache lengths are multiples of it


def memory_estimate(model_config, limits, max_batch: int, weight_format: str, compile_mode: str) -> Estimate:
    """The peak memory (runtime/peak_memory.py): the weights in their format and one Triton
    batch of up to `max_batch` prompts, each with up to --max-beams rows, as long as the longest
    prompt and output the limits allow, rounded as the Generator rounds them."""
    prompt_slots = round_up(limits.max_prompt_tokens, LENGTH_MULTIPLE)
    cache_length = round_up(prompt_slots + limits.max_tokens, LENGTH_MULTIPLE)

    def decoding(count: int) -> Decoding:          # beams expand after the prefill
        return Decoding(count * limits.max_beams, cache_length, prompt_slots, prefill_rows=count,
                        reorders=limits.max_beams > 1)
    return generation_estimate("serving.triton", model_config, weight_format, decoding, max_batch, compile_mode,
                               loader="direct", compile_flag="--compile", slots_flag="--max-batch")


def build_parser() -> argparse.ArgumentParser:
    from serving.triton_model import Limits
    parser = ArgumentParser(prog="python -m serving.triton", description=__doc__.split("\n\n")[0])
    add_weight_source_flags(parser, "served")
    parser.add_argument("--tokenizer", required=True, help="tokenizer directory/file or hub id")
    parser.add_argument("--dtype", default=None, help="compute dtype: float32, bfloat16, float16")
    add_weight_format_flag(parser)
    parser.add_argument("--compile", choices=COMPILE_MODES, default="xla",
                        help="how the decode step runs: XLA (fastest), graph, or eager")
    parser.add_argument("--address", default="127.0.0.1",
                        help="address the HTTP, gRPC and metrics endpoints listen on (0.0.0.0: every interface)")
    parser.add_argument("--http-port", type=positive_int, default=8000, help="KServe v2 HTTP port")
    parser.add_argument("--grpc-port", type=positive_int, default=8001, help="KServe v2 gRPC port")
    parser.add_argument("--metrics-port", type=positive_int, default=8002, help="Prometheus metrics port")
    parser.add_argument("--max-batch", type=positive_int, default=8,
                        help="Triton's max_batch_size: prompt rows the dynamic batcher joins into one call")
    parser.add_argument("--max-queue-delay-ms", type=float, default=5.0,
                        help="how long the dynamic batcher holds a request to fill a batch")
    parser.add_argument("--max-prompt-tokens", type=positive_int, default=Limits.max_prompt_tokens,
                        help="longer prompts get an error")
    parser.add_argument("--max-tokens-limit", type=positive_int, default=Limits.max_tokens,
                        help="largest max_tokens")
    parser.add_argument("--max-beams", type=positive_int, default=Limits.max_beams, help="largest num_beams")
    parser.add_argument("--stub-env", type=Path, default=default_stub_env(),
                        help="the Python environment (NumPy 1.x, pyzmq) of Triton's Python stub, made by "
                             "`python -m serving.triton_env` (serving/triton_env.py says why)")
    preflight.add_skip_flag(parser)
    add_verbose_flag(parser)
    return parser


def import_pytriton():
    """pytriton's Triton pieces, or ImportError naming the install commands."""
    try:
        from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
        from pytriton.triton import Triton, TritonConfig
    except ImportError as err:
        raise ImportError(f"serving.triton needs PyTriton ({err}); install it as `make test` does: "
                          "pip install -e '.[triton]' && pip install --no-deps nvidia-pytriton==0.7.0 && "
                          "python -m serving.triton_env (docs/serving.md, Triton)") from None
    return DynamicBatcher, ModelConfig, Tensor, Triton, TritonConfig


def start_triton(inference, args: argparse.Namespace):
    """A running Triton (PyTriton) with `inference` bound as MODEL_NAME; the caller stops it.
    prepare_pytriton must have run."""
    from serving.triton_model import INPUTS, OUTPUTS
    DynamicBatcher, ModelConfig, Tensor, Triton, TritonConfig = import_pytriton()
    config = TritonConfig(http_address=args.address, http_port=args.http_port, grpc_address=args.address,
                          grpc_port=args.grpc_port, metrics_address=args.address, metrics_port=args.metrics_port,
                          allow_gpu_metrics=False, exit_timeout_secs=10,
                          log_verbose=1 if args.verbose else 0)
    triton = Triton(config=config)
    batcher = DynamicBatcher(max_queue_delay_microseconds=int(args.max_queue_delay_ms * 1000))
    triton.bind(model_name=MODEL_NAME, infer_func=inference,
                inputs=[Tensor(name=s.name, dtype=s.dtype, shape=s.shape, optional=s.optional) for s in INPUTS],
                outputs=[Tensor(name=s.name, dtype=s.dtype, shape=s.shape) for s in OUTPUTS],
                config=ModelConfig(max_batch_size=args.max_batch, batcher=batcher), strict=False)
    triton.run()
    return triton


def check_ports_free(args: argparse.Namespace) -> None:
    """Each endpoint's port is free: Triton would log the clash and PyTriton wait a minute for it."""
    for flag, port in (("--http-port", args.http_port), ("--grpc-port", args.grpc_port),
                       ("--metrics-port", args.metrics_port)):
        with socket.socket() as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((args.address, port))
            except OSError as err:
                raise ValueError(f"{flag} {port}: {args.address}:{port} is not free ({err.strerror}); "
                                 f"give another port") from None


def stop_on_sigterm() -> None:
    """SIGTERM ends serving as Ctrl-C does: Triton.serve stops the server on KeyboardInterrupt."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, interrupt)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from config.params import ParamsError
    from input.tokenizer import load_tokenizer
    from runtime.logging_utils import log
    from serving.loading import load_serving_model
    from serving.triton_model import GptjInference, Limits
    limits = Limits(args.max_prompt_tokens, args.max_tokens_limit, args.max_beams)

    def check_memory(params):
        estimate = memory_estimate(params.model, limits, args.max_batch, args.weight_format, args.compile)
        preflight.check(estimate, args.skip_memory_check)
    try:
        import_pytriton()
        check_ports_free(args)
        prepare_pytriton(args.stub_env)       # before loading the model: a missing stub environment fails at once
        params, model = load_serving_model(args.params, args.model_dir, args.checkpoint_path, args.dtype,
                                           args.weight_format, args.hf_checkpoint, check=check_memory)
        tokenizer = load_tokenizer(args.tokenizer)
        tokenizer.check_fits_model(params.model.vocab_size)
        from generation.generator import Generator
        inference = GptjInference(Generator(model, args.compile, LENGTH_MULTIPLE), tokenizer, limits)
        triton = start_triton(inference, args)
    except (ParamsError, FileNotFoundError, ValueError, ImportError, TritonEnvError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    log(f"Triton serving model {MODEL_NAME!r}: http://{args.address}:{args.http_port}, "
        f"grpc {args.address}:{args.grpc_port}, metrics http://{args.address}:{args.metrics_port}/metrics")
    stop_on_sigterm()
    triton.serve()          # until SIGINT/SIGTERM (or Triton dies); then stops the server and its stub
    log("Triton stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
