"""HTTP server: OpenAI-style completions over the slot scheduler.

    python -m serving.server --params P --model-dir M --tokenizer TOK [--host 127.0.0.1 --port 8000
        --max-batch 8 --batching continuous|static --weight-format int8 ...]
    python -m serving.server --hf-checkpoint HF_DIR --tokenizer HF_DIR --weight-format int8

    POST /v1/completions   {"prompt": "def add(", "max_tokens": 32, "temperature": 0, "stream": false, ...}
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
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Optional, Union

from config.quiet import add_verbose_flag, quiet_tensorflow

if __name__ == "__main__":      # before the imports below load TensorFlow (--verbose shows its start-up lines)
    quiet_tensorflow("--verbose" in sys.argv[1:])

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt

from config.cli import ArgumentParser, positive_int
from generation.config import COMPILE_MODES, prompt_buckets, round_up
from generation.flags import add_weight_format_flag, add_weight_source_flags
from generation.config import BATCHING_MODES as MODES, GenerationConfig, GenerationConfigError
from input.tokenizer import GptTokenizer
from runtime.peak_memory import Decoding, Estimate, generation_estimate
from runtime import preflight
from serving.metrics import Metrics
# generation.batch, generation.text and serving.scheduler load TensorFlow: they are imported where
# used, so `--help` and argument errors return at once (tests/test_cli_quiet.py).

Number = Union[StrictInt, StrictFloat]


class CompletionRequest(BaseModel):
    """The OpenAI completions request, plus num_beams, repetition_penalty and bad_words."""
    model_config = ConfigDict(extra="forbid")
    model: Optional[str] = None
    prompt: Union[str, list[StrictInt]]
    max_tokens: StrictInt = Field(16, ge=1)
    temperature: Number = Field(1.0, ge=0)
    top_p: Number = Field(1.0, gt=0, le=1)
    top_k: StrictInt = Field(0, ge=0)
    n: StrictInt = Field(1, ge=1)
    stop: Union[str, list[str], None] = None
    seed: Optional[StrictInt] = None
    stream: StrictBool = False
    num_beams: StrictInt = Field(1, ge=1)
    repetition_penalty: Number = Field(1.0, gt=0)
    bad_words: list[str] = []
    min_tokens: StrictInt = Field(0, ge=0)
    ignore_eos: StrictBool = False


# Union-typed fields, whose validator messages name the union's branches rather than the field.
FIELD_HINTS = {"prompt": "must be a string or a list of integer token ids",
               "stop": "must be a string or a list of up to 4 strings"}


@dataclass(frozen=True)
class Limits:
    max_prompt_tokens: int = 512
    max_tokens: int = 256
    max_n: int = 4
    max_beams: int = 4
    request_timeout: float = 60.0
    prompt_bucket: int = 32          # prompts are left-padded to a multiple: one compiled prefill each


class RequestError(ValueError):
    def __init__(self, message: str, param: str | None = None, status: int = 400):
        super().__init__(message)
        self.param, self.status = param, status


def error_response(message: str, param: str | None, status: int, kind: str = "invalid_request_error"):
    return JSONResponse({"error": {"message": message, "type": kind, "param": param}}, status_code=status)


class Server:
    """Everything one server holds: tokenizer, limits, metrics, scheduler; `app` is its ASGI app."""

    def __init__(self, scheduler: Scheduler, tokenizer: GptTokenizer, limits: Limits, metrics: Metrics,
                 model_name: str = "gptj", max_positions: int = 2048):
        self.scheduler, self.tokenizer, self.limits, self.metrics = scheduler, tokenizer, limits, metrics
        self.model_name, self.max_positions = model_name, max_positions
        self.app = self._build_app()

    # ---- request -> job ----------------------------------------------------------------------

    def job_config(self, body: CompletionRequest) -> tuple[list[int], GenerationConfig]:
        limits = self.limits
        if isinstance(body.prompt, str):
            if not body.prompt:
                raise RequestError("prompt is empty; give some text or token ids", "prompt")
            prompt_ids = self.tokenizer.encode(body.prompt)
        else:
            prompt_ids = list(body.prompt)
            if not prompt_ids:
                raise RequestError("prompt is an empty list; give at least one token id", "prompt")
        if len(prompt_ids) > limits.max_prompt_tokens:
            raise RequestError(f"prompt has {len(prompt_ids)} tokens; this server takes at most "
                               f"{limits.max_prompt_tokens} (--max-prompt-tokens)", "prompt")
        if body.max_tokens > limits.max_tokens:
            raise RequestError(f"max_tokens={body.max_tokens} exceeds this server's limit {limits.max_tokens}",
                               "max_tokens")
        if body.n > limits.max_n:
            raise RequestError(f"n={body.n} exceeds this server's limit {limits.max_n}", "n")
        if body.num_beams > limits.max_beams:
            raise RequestError(f"num_beams={body.num_beams} exceeds this server's limit {limits.max_beams}",
                               "num_beams")
        if body.num_beams > self.scheduler.slots:
            raise RequestError(f"num_beams={body.num_beams} needs {body.num_beams} slots, one per beam, but this "
                               f"server has --max-batch {self.scheduler.slots}", "num_beams")
        if body.stream and body.num_beams > 1:
            raise RequestError("beam search knows its answer only at the end; set stream=false or num_beams=1",
                               "stream")
        stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise RequestError("stop takes up to 4 non-empty strings", "stop")
        bad_words = [self.tokenizer.encode(w) for w in body.bad_words]
        if any(not w for w in bad_words):
            raise RequestError("bad_words holds an empty string", "bad_words")
        eos = self.tokenizer.eos_id
        try:
            config = GenerationConfig(
                max_new_tokens=body.max_tokens, min_new_tokens=min(body.min_tokens, body.max_tokens),
                do_sample=body.temperature > 0, temperature=float(body.temperature) if body.temperature > 0 else 1.0,
                top_k=body.top_k, top_p=float(body.top_p), repetition_penalty=float(body.repetition_penalty),
                num_beams=body.num_beams, num_return_sequences=body.n,
                stop_token_ids=() if body.ignore_eos else (eos,), stop_strings=tuple(stops),
                bad_words_ids=tuple(tuple(w) for w in bad_words), pad_token_id=eos,
                early_stopping=True if body.num_beams > 1 else False)
            config.check_against_model(self.scheduler.decoder.model.config.vocab_size)
            config.check_prompts([prompt_ids], self.max_positions, self.scheduler.decoder.model.config.vocab_size)
        except GenerationConfigError as err:
            raise RequestError(str(err), None) from None
        return prompt_ids, config

    def final_text(self, ids: list[int], config: GenerationConfig, stop) -> tuple[str, list[int]]:
        from generation.text import find_stop_string, strip_stop_token
        if isinstance(stop, int):
            ids = strip_stop_token(ids, config.stop_token_ids)
        text = self.tokenizer.decode(ids, skip_unknown=True)
        if isinstance(stop, str):
            text = text[:find_stop_string(text, config.stop_strings)[0]]
        return text, ids

    # ---- the app -----------------------------------------------------------------------------

    def _build_app(self) -> FastAPI:
        @asynccontextmanager
        async def lifespan(app):
            yield
            await asyncio.get_running_loop().run_in_executor(None, self.scheduler.stop)

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

        @app.post("/v1/completions")
        async def completions(body: CompletionRequest):
            return await self.complete(body)

        return app

    async def complete(self, body: CompletionRequest):
        from generation.text import stop_string_checker
        from serving.scheduler import Draining, Job, QueueFull
        try:
            prompt_ids, config = self.job_config(body)
        except RequestError as err:
            self.metrics.requests.labels("invalid").inc()
            return error_response(str(err), err.param, err.status)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def sink(kind, sequence, payload):
            loop.call_soon_threadsafe(events.put_nowait, (kind, sequence, payload))

        seed = body.seed if body.seed is not None else random.randrange(2 ** 31)
        checker = None
        if config.stop_strings:
            check = stop_string_checker(self.tokenizer, config)
            checker = lambda ids: check([ids]).get(0)     # noqa: E731
        job = Job(prompt_ids, config, seed, sink, checker, time.monotonic() + self.limits.request_timeout)
        try:
            self.scheduler.submit(job)
        except QueueFull as err:
            self.metrics.requests.labels("rejected").inc()
            return error_response(str(err), None, 429, "queue_full")
        except Draining as err:
            self.metrics.requests.labels("rejected").inc()
            return error_response(str(err), None, 503, "unavailable")
        self.metrics.prompt_tokens.inc(len(prompt_ids))
        ident = f"cmpl-{uuid.uuid4().hex[:24]}"
        head = {"id": ident, "object": "text_completion", "created": int(time.time()), "model": self.model_name}
        if body.stream:
            return StreamingResponse(self._stream(job, events, head, len(prompt_ids)), media_type="text/event-stream")
        return await self._collect(job, events, head, len(prompt_ids))

    async def _collect(self, job: Job, events: asyncio.Queue, head: dict, prompt_tokens: int):
        count = job.config.num_return_sequences
        choices: dict[int, dict] = {}
        try:
            while len(choices) < count:
                kind, sequence, payload = await events.get()
                if kind == "error":
                    return self._failed(payload)
                if kind == "finish":
                    text, ids = self.final_text(payload.token_ids, job.config, payload.stop)
                    choices[sequence] = {"text": text, "index": sequence, "logprobs": None,
                                         "finish_reason": payload.finish_reason, "token_ids": ids}
        except asyncio.CancelledError:
            self.scheduler.cancel(job)
            raise
        self._finished(job)
        completion_tokens = sum(len(c["token_ids"]) for c in choices.values())
        return JSONResponse({**head, "choices": [choices[i] for i in range(count)],
                             "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                                       "total_tokens": prompt_tokens + completion_tokens}})

    async def _stream(self, job: Job, events: asyncio.Queue, head: dict, prompt_tokens: int):
        from generation.text import TextStream
        count = job.config.num_return_sequences
        pieces: list[str] = []
        streams = [TextStream(self.tokenizer, job.config, pieces.append) for _ in range(count)]
        finished = 0

        def chunk(index: int, text: str, reason=None, extra=None) -> str:
            choice = {"text": text, "index": index, "logprobs": None, "finish_reason": reason, **(extra or {})}
            return f"data: {json.dumps({**head, 'choices': [choice]})}\n\n"

        try:
            while finished < count:
                kind, sequence, payload = await events.get()
                if kind == "error":
                    self._count_error(payload)
                    yield f"data: {json.dumps({'error': {'message': self._error_message(payload), 'type': payload}})}\n\n"
                    break
                if kind == "tokens":
                    streams[sequence].update(payload)
                    reason, extra = None, None
                else:
                    text, ids = self.final_text(payload.token_ids, job.config, payload.stop)
                    streams[sequence].finish(text)
                    reason, extra = payload.finish_reason, {"token_ids": ids}
                    finished += 1
                if pieces or reason:
                    yield chunk(sequence, "".join(pieces), reason, extra)
                    pieces.clear()
            else:
                self._finished(job)
            yield "data: [DONE]\n\n"
        finally:
            if finished < count:               # the client left (or the job failed): free its slots
                self.scheduler.cancel(job)

    def _finished(self, job: Job) -> None:
        self.metrics.requests.labels("ok").inc()
        self.metrics.latency.observe(time.monotonic() - job.arrived)

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
    cache rows of the slot length, and a beam or bad-words request's rows (up to max_beams or
    max_n) decoded beside them by the Generator; a `--max-batch` whose cache does not fit is
    refused, naming the largest that does."""
    length = slot_cache_length(limits, model_config.max_position_embeddings)
    # one compiled prefill per prompt bucket (serving.scheduler.Scheduler.warm_up: multiples of
    # --prompt-bucket below the cache length), compiled at start or as prompts of each length arrive
    bucket = limits.prompt_bucket
    buckets = len(prompt_buckets(limits.max_prompt_tokens, bucket, length))

    def decoding(count: int) -> Decoding:
        return Decoding(rows=max(limits.max_beams, limits.max_n), cache_length=length,
                        prompt_slots=round_up(limits.max_prompt_tokens, bucket), prefill_rows=1, slot_rows=count,
                        prefill_programs=buckets)
    return generation_estimate("serving.server", model_config, weight_format, decoding, slots, compile_mode,
                               loader="direct", compile_flag="--compile", slots_flag="--max-batch")


def build_server(model, tokenizer: GptTokenizer, slots: int = 8, batching: str = "continuous",
                 limits: Limits = Limits(), max_queue: int = 64, max_wait: float = 0.02,
                 compile_mode: str = "xla", model_name: str = "gptj", steps_per_call: int = 8,
                 warm_up: bool = False) -> Server:
    """A Server whose cache fits the longest prompt and output the limits allow; with warm_up,
    every prompt bucket is compiled before it listens."""
    from serving.scheduler import Scheduler
    max_positions = model.config.max_position_embeddings
    cache_length = slot_cache_length(limits, max_positions)
    metrics = Metrics()
    scheduler = Scheduler(model, slots, cache_length, batching, max_queue, max_wait, compile_mode,
                          length_multiple=limits.prompt_bucket, metrics=metrics, steps_per_call=steps_per_call,
                          max_beams=limits.max_beams)
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
                    args.prompt_bucket)

    def check_memory(params):
        estimate = memory_estimate(params.model, limits, args.max_batch, args.weight_format, args.compile)
        preflight.check(estimate, args.skip_memory_check)
    try:
        params, model = load_serving_model(args.params, args.model_dir, args.checkpoint_path, args.dtype,
                                           args.weight_format, args.hf_checkpoint, check=check_memory)
        tokenizer = load_tokenizer(args.tokenizer)
        tokenizer.check_fits_model(params.model.vocab_size)
        server = build_server(model, tokenizer, args.max_batch, args.batching, limits, args.max_queue,
                              args.max_wait_ms / 1000, args.compile, steps_per_call=args.steps_per_call,
                              warm_up=args.warm_up)
    except (ParamsError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    log(f"serving on http://{args.host}:{args.port} ({args.batching} batching, {args.max_batch} slots)")
    serve(server, args.host, args.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
