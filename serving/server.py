"""HTTP server: OpenAI-style completions over the slot scheduler.

    python -m serving.server --params P --model-dir M --tokenizer TOK [--host 127.0.0.1 --port 8000
        --max-batch 8 --batching continuous|static --weight-format int8 ...]
    python -m serving.server --hf-checkpoint HF_DIR --tokenizer HF_DIR --weight-format int8

    POST /v1/completions   {"prompt": "def add(", "max_tokens": 32, "temperature": 0, "stream": false, ...}
                           (+ "logprobs": 0..--max-logprobs, "echo": true: OpenAI's legacy scoring fields)
    GET  /v1/models        {"object": "list", "data": [{"id": "gptj", ...}]} (--served-model-name)
    GET  /health           {"status": "ok" | "draining", "queue_depth": ..., "busy_slots": ...}
    GET  /metrics          Prometheus text

The HTTP layer parses, validates, queues and streams; the scheduler thread owns the model.
SIGTERM stops accepting connections, lets running requests finish, then exits.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from config.quiet import add_verbose_flag, quiet_tensorflow

if __name__ == "__main__":      # before the imports below load TensorFlow (--verbose shows its start-up lines)
    quiet_tensorflow("--verbose" in sys.argv[1:])

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse

from config.cli import ArgumentParser, positive_int
from generation.config import COMPILE_MODES, prompt_buckets, round_up
from generation.flags import add_weight_format_flag, add_weight_source_flags
from generation.config import BATCHING_MODES as MODES, GenerationConfig
from input.tokenizer import GptTokenizer
from runtime.peak_memory import Decoding, Estimate, generation_estimate
from runtime import preflight
from serving.completion_request import (FIELD_HINTS, CompletionRequest, Limits, RequestError, error_response,
                                        given_prompts, request_config, request_prompts)
from serving.metrics import Metrics

if TYPE_CHECKING:
    from generation.results import Generation
    from serving.scheduler import Job, Scheduler
# generation.batch, generation.text, serving.scheduler and serving.logprobs load TensorFlow: they are
# imported where used, so `--help` and argument errors return at once (tests/test_cli_quiet.py).

__all__ = ["Limits", "Server", "build_server", "memory_estimate", "main"]

SERVED_MODEL_NAME = "gptj"      # the id GET /v1/models lists and `model` may name, unless --served-model-name


class Server:
    """Everything one server holds: tokenizer, limits, metrics, scheduler; `app` is its ASGI app."""

    def __init__(self, scheduler: Scheduler, tokenizer: GptTokenizer, limits: Limits, metrics: Metrics,
                 model_name: str = SERVED_MODEL_NAME, max_positions: int = 2048):
        from serving.logprobs import Scorer
        self.scheduler, self.tokenizer, self.limits, self.metrics = scheduler, tokenizer, limits, metrics
        self.model_name, self.max_positions = model_name, max_positions
        self.created = int(time.time())
        # Scoring passes (logprobs) run one at a time beside the scheduler thread, never in its slot batch.
        self.scorer = Scorer(scheduler.decoder.model)
        self.scoring = ThreadPoolExecutor(1, thread_name_prefix="scoring")
        self.app = self._build_app()

    # ---- request -> jobs ---------------------------------------------------------------------

    def check_request(self, body: CompletionRequest) -> tuple[list[list[int]], GenerationConfig]:
        """(token ids per prompt, their GenerationConfig), or a RequestError naming the field."""
        if body.model is not None and body.model != self.model_name:
            raise RequestError(f"model {body.model!r} is not served here; this server serves {self.model_name!r} "
                               "(GET /v1/models)", "model", 404, "model_not_found")
        prompts = request_prompts(body, self.tokenizer, self.limits)
        vocab_size = self.scheduler.decoder.model.config.vocab_size
        config = request_config(body, prompts, self.tokenizer, self.limits, vocab_size, self.max_positions)
        if config.num_beams > self.scheduler.slots:
            raise RequestError(f"num_beams={config.num_beams} needs {config.num_beams} slots, one per beam, but this "
                               f"server has --max-batch {self.scheduler.slots}", "num_beams")
        return prompts, config

    def final_text(self, ids: list[int], config: GenerationConfig, stop) -> tuple[str, list[int]]:
        from generation.text import find_stop_string, strip_stop_token
        if isinstance(stop, int):
            ids = strip_stop_token(ids, config.stop_token_ids)
        text = self.tokenizer.decode(ids, skip_unknown=True)
        if isinstance(stop, str):
            text = text[:find_stop_string(text, config.stop_strings)[0]]
        return text, ids

    def prompt_texts(self, body: CompletionRequest, prompts: list[list[int]]) -> list[str]:
        """What echo shows of each prompt: the text given, or the text of the token ids given."""
        return [text if isinstance(text, str) else self.tokenizer.decode(ids, skip_unknown=True)
                for text, ids in zip(given_prompts(body), prompts)]

    def model_card(self) -> dict:
        return {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "gptj-tf",
                "max_model_len": self.max_positions}

    # ---- the app -----------------------------------------------------------------------------

    def _build_app(self) -> FastAPI:
        @asynccontextmanager
        async def lifespan(app):
            yield
            await asyncio.get_running_loop().run_in_executor(None, self.scheduler.stop)
            self.scoring.shutdown(wait=False, cancel_futures=True)

        app = FastAPI(title="gptj-tf", lifespan=lifespan)

        @app.exception_handler(RequestValidationError)
        async def invalid(request, exc: RequestValidationError):
            first = exc.errors()[0]
            where = [str(p) for p in first.get("loc", ()) if p != "body"]
            if first.get("type") == "json_invalid":
                return error_response(f"the body is not valid JSON ({first.get('msg')})", None, 400)
            field = where[0] if where else None
            if first.get("type") == "extra_forbidden":
                message = f"unknown field {field!r}; see docs/serving.md for the fields this server reads"
            elif field in FIELD_HINTS and first.get("type") != "missing":
                message = f"{field}: {FIELD_HINTS[field]}"
            else:
                message = f"{field or 'body'}: {first.get('msg')}"
            return error_response(message, field, 400)

        @app.get("/health")
        async def health():
            status = "draining" if self.scheduler.draining else "ok"
            return JSONResponse({"status": status, "queue_depth": self.scheduler.queue_depth,
                                 "busy_slots": self.scheduler.busy_rows, "slots": self.scheduler.slots,
                                 "batching": self.scheduler.mode}, status_code=200 if status == "ok" else 503)

        @app.get("/metrics")
        async def metrics():
            return Response(self.metrics.text(), media_type="text/plain; version=0.0.4")

        @app.get("/v1/models")
        async def models():
            return JSONResponse({"object": "list", "data": [self.model_card()]})

        @app.get("/v1/models/{model_id:path}")
        async def model(model_id: str):
            if model_id != self.model_name:
                return error_response(f"model {model_id!r} is not served here; this server serves "
                                      f"{self.model_name!r}", "model", 404, "model_not_found")
            return JSONResponse(self.model_card())

        @app.post("/v1/completions")
        async def completions(body: CompletionRequest):
            return await self.complete(body)

        return app

    async def complete(self, body: CompletionRequest):
        from generation.text import stop_string_checker
        from serving.scheduler import Draining, Job, QueueFull
        arrived = time.monotonic()
        try:
            prompts, config = self.check_request(body)
        except RequestError as err:
            self.metrics.requests.labels("invalid").inc()
            return error_response(str(err), err.param, err.status, err.kind)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()      # (prompt index, kind, sequence, payload)

        def sink_of(index: int):
            return lambda kind, sequence, payload: loop.call_soon_threadsafe(
                events.put_nowait, (index, kind, sequence, payload))

        jobs = []
        if body.max_tokens > 0:                      # max_tokens=0 (echo): nothing to generate
            try:
                for index, prompt_ids in enumerate(prompts):
                    # one seed for every prompt when given (each answers as it would alone), else one each
                    seed = body.seed if body.seed is not None else random.randrange(2 ** 31)
                    checker = None
                    if config.stop_strings:
                        check = stop_string_checker(self.tokenizer, config)
                        checker = lambda ids, check=check: check([ids]).get(0)     # noqa: E731
                    job = Job(prompt_ids, config, seed, sink_of(index), checker, arrived + self.limits.request_timeout)
                    self.scheduler.submit(job)
                    jobs.append(job)
            except (QueueFull, Draining) as err:
                self._cancel(jobs)
                self.metrics.requests.labels("rejected").inc()
                if isinstance(err, QueueFull):
                    return error_response(str(err), None, 429, "queue_full")
                return error_response(str(err), None, 503, "unavailable")
        self.metrics.prompt_tokens.inc(sum(len(p) for p in prompts))
        ident = f"cmpl-{uuid.uuid4().hex[:24]}"
        head = {"id": ident, "object": "text_completion", "created": int(time.time()), "model": self.model_name}
        if body.stream:
            return StreamingResponse(self._stream(body, prompts, config, jobs, events, head, arrived),
                                     media_type="text/event-stream")
        return await self._collect(body, prompts, config, jobs, events, head, arrived)

    async def _collect(self, body: CompletionRequest, prompts: list[list[int]], config: GenerationConfig,
                       jobs: list[Job], events: asyncio.Queue, head: dict, arrived: float):
        n = body.n
        results: dict[int, Generation] = {}          # choice index (prompt index x n + sequence) -> result
        try:
            while len(results) < len(jobs) * n:
                index, kind, sequence, payload = await events.get()
                if kind == "error":
                    self._cancel(jobs)
                    return self._failed(payload)
                if kind == "finish":
                    results[index * n + sequence] = payload
            texts = self.prompt_texts(body, prompts) if body.echo else None
            choices = [await self._choice(body, config, prompts[c // n], results.get(c), c,
                                          texts[c // n] if texts else None) for c in range(len(prompts) * n)]
        except asyncio.CancelledError:
            self._cancel(jobs)
            raise
        self._finished(arrived)
        prompt_tokens = sum(len(p) for p in prompts)
        completion_tokens = sum(len(c["token_ids"]) for c in choices)
        return JSONResponse({**head, "choices": choices,
                             "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                                       "total_tokens": prompt_tokens + completion_tokens}})

    async def _choice(self, body: CompletionRequest, config: GenerationConfig, prompt_ids: list[int],
                      result: Generation | None, index: int, prompt_text: str | None) -> dict:
        """One choice of a finished request (result None: max_tokens=0, the prompt only)."""
        from serving.logprobs import completion_logprobs
        generated = list(result.token_ids) if result is not None else []    # a final stop token included
        text, ids = self.final_text(generated, config, result.stop) if result is not None else ("", [])
        choice = {"text": (prompt_text or "") + text, "index": index, "logprobs": None,
                  "finish_reason": result.finish_reason if result is not None else "length", "token_ids": ids}
        if body.logprobs is not None:
            # The stop token that ended a sequence is scored too (its text is not in `text`): a
            # client reading the generated token's logprob finds it whatever the token was.
            sequence = prompt_ids + generated
            scored = await asyncio.get_running_loop().run_in_executor(
                self.scoring, self.scorer.score, sequence, body.logprobs)
            first = 0 if body.echo else len(prompt_ids)
            choice["logprobs"] = completion_logprobs(self.tokenizer, sequence, scored, first, body.logprobs)
        return choice

    async def _stream(self, body: CompletionRequest, prompts: list[list[int]], config: GenerationConfig,
                      jobs: list[Job], events: asyncio.Queue, head: dict, arrived: float):
        from generation.text import TextStream
        n, count = body.n, len(prompts) * body.n
        pieces: list[list[str]] = [[] for _ in range(count)]
        streams = [TextStream(self.tokenizer, config, pieces[c].append) for c in range(count)]
        finished = 0

        def chunk(index: int, text: str, reason=None, extra=None) -> str:
            choice = {"text": text, "index": index, "logprobs": None, "finish_reason": reason, **(extra or {})}
            return f"data: {json.dumps({**head, 'choices': [choice]})}\n\n"

        try:
            if body.echo:
                for c, text in enumerate(t for t in self.prompt_texts(body, prompts) for _ in range(n)):
                    yield chunk(c, text)
            if not jobs:                                # max_tokens=0: the echo was all
                for c in range(count):
                    yield chunk(c, "", "length", {"token_ids": []})
                finished = count
            while finished < count:
                index, kind, sequence, payload = await events.get()
                if kind == "error":
                    self._count_error(payload)
                    yield f"data: {json.dumps({'error': {'message': self._error_message(payload), 'type': payload}})}\n\n"
                    break
                c = index * n + sequence
                if kind == "tokens":
                    streams[c].update(payload)
                    reason, extra = None, None
                else:
                    text, ids = self.final_text(payload.token_ids, config, payload.stop)
                    streams[c].finish(text)
                    reason, extra = payload.finish_reason, {"token_ids": ids}
                    finished += 1
                if pieces[c] or reason:
                    yield chunk(c, "".join(pieces[c]), reason, extra)
                    pieces[c].clear()
            else:
                self._finished(arrived)
            yield "data: [DONE]\n\n"
        finally:
            if finished < count:               # the client left (or a job failed): free the slots
                self._cancel(jobs)

    def _cancel(self, jobs: list[Job]) -> None:
        for job in jobs:
            self.scheduler.cancel(job)

    def _finished(self, arrived: float) -> None:
        self.metrics.requests.labels("ok").inc()
        self.metrics.latency.observe(time.monotonic() - arrived)

    @staticmethod
    def _error_message(reason: str) -> str:
        if reason == "timeout":
            return "the request exceeded --request-timeout before it finished"
        return reason

    def _count_error(self, reason: str) -> None:
        self.metrics.requests.labels("timeout" if reason == "timeout" else "error").inc()

    def _failed(self, reason: str):
        self._count_error(reason)
        status = 504 if reason == "timeout" else 500
        return error_response(self._error_message(reason), None, status, reason)


def slot_cache_length(limits: Limits, max_positions: int) -> int:
    """The slots' cache length L: the longest prompt (rounded up to its bucket) and output the limits allow."""
    longest = round_up(limits.max_prompt_tokens, limits.prompt_bucket)
    cache_length = min(longest + limits.max_tokens, round_up(max_positions, 32) + limits.prompt_bucket)
    return round_up(cache_length, 32)


def memory_estimate(model_config, limits: Limits, slots: int, weight_format: str, compile_mode: str) -> Estimate:
    """The server's peak memory (runtime/peak_memory.py): the weights in their format, `slots`
    cache rows of the slot length, and a whole request's rows (beam sampling, or settings past a
    row's caps: up to max_beams or max_n) decoded beside them by the Generator; a `--max-batch`
    whose cache does not fit is refused, naming the largest that does."""
    length = slot_cache_length(limits, model_config.max_position_embeddings)
    # one compiled prefill per prompt bucket (serving.scheduler.Scheduler.warm_up: multiples of
    # --prompt-bucket below the cache length), compiled at start or as prompts of each length arrive
    bucket = limits.prompt_bucket
    buckets = len(prompt_buckets(limits.max_prompt_tokens, bucket, length))

    def decoding(count: int) -> Decoding:
        # the larger whole request beside the slots: a beam search (its step reorders the rows'
        # cache) or max_n sampled rows
        shared = dict(cache_length=length, prompt_slots=round_up(limits.max_prompt_tokens, bucket), prefill_rows=1,
                      slot_rows=count, prefill_programs=buckets)
        beams = Decoding(rows=limits.max_beams, reorders=limits.max_beams > 1, **shared)
        samples = Decoding(rows=limits.max_n, **shared)
        return max(beams, samples, key=lambda d: d.rows * d.copies)
    return generation_estimate("serving.server", model_config, weight_format, decoding, slots, compile_mode,
                               loader="direct", compile_flag="--compile", slots_flag="--max-batch")


def build_server(model, tokenizer: GptTokenizer, slots: int = 8, batching: str = "continuous",
                 limits: Limits = Limits(), max_queue: int = 64, max_wait: float = 0.02,
                 compile_mode: str = "xla", model_name: str = SERVED_MODEL_NAME, steps_per_call: int = 8,
                 warm_up: bool = False, slot_beams: bool = True) -> Server:
    """A Server whose cache fits the longest prompt and output the limits allow; with warm_up,
    every prompt bucket is compiled before it listens. slot_beams=False runs every beam search
    as a whole request through the Generator, one at a time (the path before beam groups took
    slots; bench.serve's peer)."""
    from serving.scheduler import Scheduler
    max_positions = model.config.max_position_embeddings
    cache_length = slot_cache_length(limits, max_positions)
    metrics = Metrics()
    scheduler = Scheduler(model, slots, cache_length, batching, max_queue, max_wait, compile_mode,
                          length_multiple=limits.prompt_bucket, metrics=metrics, steps_per_call=steps_per_call,
                          max_beams=limits.max_beams if slot_beams else 1)
    if warm_up:
        scheduler.warm_up(limits.max_prompt_tokens)
    scheduler.start()
    return Server(scheduler, tokenizer, limits, metrics, model_name, max_positions)


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="python -m serving.server", description=__doc__.split("\n\n")[0])
    add_weight_source_flags(parser, "served")
    parser.add_argument("--tokenizer", required=True, help="tokenizer directory/file or hub id")
    parser.add_argument("--dtype", default=None, help="compute dtype: float32, bfloat16, float16")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=8000, help="TCP port to listen on")
    parser.add_argument("--max-batch", type=int, default=8, help="cache slots decoded together")
    parser.add_argument("--batching", choices=MODES, default="continuous",
                        help="continuous: requests join and leave at every step; static: whole batches")
    parser.add_argument("--max-wait-ms", type=float, default=20.0, help="static batching: wait this long to fill")
    parser.add_argument("--max-queue", type=int, default=64, help="queued requests before 429")
    parser.add_argument("--max-prompt-tokens", type=int, default=Limits.max_prompt_tokens,
                        help="longer prompts get a 400")
    parser.add_argument("--prompt-bucket", type=positive_int, default=Limits.prompt_bucket,
                        help="prompts are padded to a multiple of this; each multiple is one compiled prefill "
                             "(GPT-J 6B: ~300 MB each), so long prompts want a coarser bucket, e.g. 256")
    parser.add_argument("--max-tokens-limit", type=int, default=Limits.max_tokens, help="largest max_tokens")
    parser.add_argument("--max-n", type=int, default=Limits.max_n, help="largest n (completions per request)")
    parser.add_argument("--max-beams", type=int, default=Limits.max_beams, help="largest num_beams")
    parser.add_argument("--max-logprobs", type=int, default=Limits.max_logprobs,
                        help="largest logprobs (top tokens per position); each logprobs request costs a scoring "
                             "pass over prompt and completion")
    parser.add_argument("--served-model-name", default=SERVED_MODEL_NAME,
                        help="the model id GET /v1/models lists; a request's `model` must be it (or absent)")
    parser.add_argument("--request-timeout", type=float, default=Limits.request_timeout, help="seconds")
    parser.add_argument("--compile", choices=COMPILE_MODES, default="xla",
                        help="how the decode step runs: XLA (fastest), graph, or eager")
    add_weight_format_flag(parser)
    parser.add_argument("--steps-per-call", type=int, default=8,
                        help="decode steps per compiled call (a call also ends when a row finishes)")
    parser.add_argument("--warm-up", action=argparse.BooleanOptionalAction, default=True,
                        help="compile every prompt bucket before listening (seconds each under XLA)")
    preflight.add_skip_flag(parser)
    add_verbose_flag(parser)
    return parser


def serve(server: Server, host: str, port: int) -> None:
    """Run until SIGTERM/SIGINT: then stop accepting, drain running requests, stop the scheduler."""
    import uvicorn

    class Draining(uvicorn.Server):
        def handle_exit(self, sig, frame):
            server.scheduler.draining = True
            super().handle_exit(sig, frame)

    Draining(uvicorn.Config(server.app, host=host, port=port, log_level="warning",
                            timeout_graceful_shutdown=server.limits.request_timeout)).run()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from config.params import ParamsError
    from input.tokenizer import load_tokenizer
    from runtime.logging_utils import log
    from serving.loading import load_serving_model
    limits = Limits(args.max_prompt_tokens, args.max_tokens_limit, args.max_n, args.max_beams, args.request_timeout,
                    args.prompt_bucket, args.max_logprobs)

    def check_memory(params):
        estimate = memory_estimate(params.model, limits, args.max_batch, args.weight_format, args.compile)
        preflight.check(estimate, args.skip_memory_check)
    try:
        params, model = load_serving_model(args.params, args.model_dir, args.checkpoint_path, args.dtype,
                                           args.weight_format, args.hf_checkpoint, check=check_memory)
        tokenizer = load_tokenizer(args.tokenizer)
        tokenizer.check_fits_model(params.model.vocab_size)
        server = build_server(model, tokenizer, args.max_batch, args.batching, limits, args.max_queue,
                              args.max_wait_ms / 1000, args.compile, args.served_model_name, args.steps_per_call,
                              warm_up=args.warm_up)
    except (ParamsError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    log(f"serving on http://{args.host}:{args.port} ({args.batching} batching, {args.max_batch} slots)")
    serve(server, args.host, args.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
