"""Benchmark: the HTTP server's continuous batching vs static (whole-request) batching.

    python -m bench.serve [--hidden 256] [--layers 4] [--vocab 2048] [--slots 16]
                          [--concurrency 1,4,16] [--requests-per-client 8] [--steps-per-call 8] [--rounds 3]
                          [--compile xla]
    python -m bench.serve --beams 4 [--groups 8] [--concurrency 8] [--requests-per-client 8] [--rounds 3]

One random GPT-J is served on loopback by two servers, one per batching mode, with the same
slots, each compiled for every prompt bucket before it is measured. At concurrency c, c clients (in a
process of their own, bench/serve_client.py) keep
c requests in flight: each takes the next request of one fixed list of c x
requests-per-client greedy requests with mixed prompt lengths (8-200 tokens) and output
lengths (mostly short, some long; EOS ignored so every request makes exactly max_tokens) as
soon as its previous one is answered. (Fixed per-client shares would time the client that
drew the most long requests, whatever the server does.) Each level runs --rounds times per
mode, the modes alternating, so a busy spell of a shared machine hits both. Reported: median requests/s and
generated tokens/s, p50/p99 latency over all rounds' requests, and where the scheduler thread's time went (decode
steps, prefills, host work, compilation); then the continuous/static ratios. Target:
continuous >= 1.5x static tokens/s at concurrency 16, and a lower p99.

With --beams k the load is beam search instead (MLPerf GPT-J's queries are 4-beam searches):
the same requests with num_beams=k, served by three servers, rounds alternating: one of
--groups x k slots (groups beam groups decoding together: "concurrent"); one of k slots, one
group at a time with the same code ("serial slots"); and one that runs each beam search whole
through the Generator, one at a time, as every beam request was served before beam groups
took slots ("whole"; each of its prompt and length shapes compiled once before it is
measured). Reported as above, then concurrent's ratios to both. Target: >= 2x tokens/s with
8 groups (8 slots per beam width, 32 slots for 4 beams) over serial service. `--hidden 4096
--layers 2` gives the layers GPT-J-6B's width; the target run is `--concurrency 16
--requests-per-client 8 --rounds 1` (about 37 minutes on 2 cores; docs/serving.md has the figures).
"""
from __future__ import annotations

import os
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor

from config.quiet import add_verbose_flag, quiet_tensorflow

if __name__ == "__main__":      # before the imports below load TensorFlow (--verbose shows its start-up lines)
    quiet_tensorflow("--verbose" in sys.argv[1:])

import numpy as np
import requests

from bench.machine import describe_machine
from bench.serve_client import run_level, workload
from config.cli import ArgumentParser
from config.params import ModelParams
from input.scripts.train_tokenizer import train_tokenizer
from model import GPTJModel
from serving.scheduler import MODES, LoopProfile
from serving.server import Limits, build_server


def combine(rounds: list[dict]) -> dict:
    """Rounds of one mode and level -> median rates, p50/p99 over every request of every round."""
    latencies = [t for r in rounds for t in r["latencies"]]
    return {"requests/s": float(np.median([r["requests/s"] for r in rounds])),
            "tokens/s": float(np.median([r["tokens/s"] for r in rounds])),
            "p50 s": float(np.percentile(latencies, 50)), "p99 s": float(np.percentile(latencies, 99))}


def serve_in_thread(server) -> tuple[object, threading.Thread, str]:
    import socket

    import uvicorn
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # log_config=None: uvicorn would otherwise re-configure logging process-wide (a bench or harness
    # runs it inside its own process)
    uv = uvicorn.Server(uvicorn.Config(server.app, host="127.0.0.1", port=port, log_level="warning", log_config=None))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    while True:
        try:
            requests.get(url + "/health", timeout=1)
            return uv, thread, url
        except requests.ConnectionError:
            time.sleep(0.1)


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m bench.serve", description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=256, help="model width")
    parser.add_argument("--layers", type=int, default=4, help="decoder blocks")
    parser.add_argument("--vocab", type=int, default=2048, help="vocabulary size")
    parser.add_argument("--slots", type=int, default=16, help="KV-cache slots (largest batch)")
    parser.add_argument("--concurrency", default="1,4,16", help="comma-separated client counts")
    parser.add_argument("--requests-per-client", type=int, default=8,
                        help="requests per client: c x this many requests at concurrency c")
    parser.add_argument("--steps-per-call", type=int, default=8, help="decode steps per compiled call")
    parser.add_argument("--rounds", type=int, default=3,
                        help="runs per mode and level, the modes alternating; rates are the median")
    parser.add_argument("--compile", choices=("xla", "graph"), default="xla", help="how the decode step runs")
    parser.add_argument("--beams", type=int, default=1,
                        help="k > 1: a beam-search load, concurrent groups against one group at a time in "
                             "slots and against each search whole through the Generator")
    parser.add_argument("--groups", type=int, default=8, help="--beams: beam groups decoding together (slots / k)")
    add_verbose_flag(parser)
    args = parser.parse_args(argv)
    if args.beams > 1 and args.concurrency == parser.get_default("concurrency"):
        args.concurrency = str(args.groups)
    levels = [int(c) for c in args.concurrency.split(",")]
    print(describe_machine())
    config = ModelParams(vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
                         num_heads=max(args.hidden // 64, 1), rotary_dim=min(64, args.hidden // max(args.hidden // 64, 1)),
                         filter_size=4 * args.hidden, max_position_embeddings=512)
    model = GPTJModel(config, seed=0)
    with tempfile.TemporaryDirectory() as work:
        tokenizer = train_tokenizer(["the cat sat on the mat"] * 3, os.path.join(work, "tok"), vocab_size=300)
    limits = Limits(max_prompt_tokens=224, max_tokens=128, max_beams=max(args.beams, 1), request_timeout=600)
    if args.beams > 1:
        # the servers to compare: k beam groups at once, and one at a time (serial service)
        variants = {"concurrent": dict(slots=args.groups * args.beams, batching="continuous"),
                    "serial slots": dict(slots=args.beams, batching="continuous"),
                    "whole": dict(slots=args.beams, batching="continuous", slot_beams=False)}
        extra = {"num_beams": args.beams}
    else:
        variants = {mode: dict(slots=args.slots, batching=mode) for mode in MODES}
        extra = {}
    print(f"model: hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}; "
          + ", ".join(f"{name} {v['slots']} slots" for name, v in variants.items())
          + f"; compile {args.compile}; {args.steps_per_call} steps per decode call"
          + (f"; {args.beams}-beam requests" if extra else ""))
    import multiprocessing
    clients = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))   # the load generator

    def load(url: str, jobs: list[dict], concurrency: int) -> dict:
        return clients.submit(run_level, url, jobs, concurrency).result()

    def jobs_of(count: int, seed: int) -> list[dict]:
        return [{**job, **extra} for job in workload(count, args.vocab, seed=seed)]

    servers, running = {}, []
    for mode, variant in variants.items():
        server = build_server(model, tokenizer, variant["slots"], variant["batching"], limits, max_queue=1024,
                              max_wait=0.02, compile_mode=args.compile, steps_per_call=args.steps_per_call,
                              warm_up=True, slot_beams=variant.get("slot_beams", True))
        print(f"{mode}: compiled {server.scheduler.profile.warm_up:.1f} s before serving", flush=True)
        uv, thread, url = serve_in_thread(server)
        servers[mode] = (server.scheduler, url)
        running.append((uv, thread, server))
        load(url, jobs_of(8, 99), 4)                                # warm-up: the HTTP path, thread pools
    results: dict[tuple[str, int], dict] = {}
    for c in levels:
        jobs = jobs_of(c * args.requests_per_client, c)
        rounds: dict[str, list[dict]] = {mode: [] for mode in variants}
        profiles: dict[str, LoopProfile] = {}
        for mode, variant in variants.items():
            if not variant.get("slot_beams", True):               # the Generator compiles per shape: not timed
                start = time.perf_counter()
                load(servers[mode][1], jobs, c)
                print(f"{mode}: compiled its shapes for c={c} in {time.perf_counter() - start:.1f} s", flush=True)
        for _ in range(args.rounds):                                # modes alternate: a busy spell hits both
            for mode in variants:
                scheduler, url = servers[mode]
                scheduler.profile, traces = LoopProfile(), scheduler.decoder.traces   # idle between runs
                rounds[mode].append(load(url, jobs, c))
                profiles[mode] = scheduler.profile
                if scheduler.decoder.traces != traces:
                    print(f"warning: {mode} compiled {scheduler.decoder.traces - traces} time(s) while serving",
                          flush=True)
        for mode in variants:
            r = results[(mode, c)] = combine(rounds[mode])
            print(f"{mode:12s} c={c:3d}  {r['requests/s']:7.2f} req/s  {r['tokens/s']:8.1f} tok/s  "
                  f"p50 {r['p50 s']:6.2f}s  p99 {r['p99 s']:6.2f}s", flush=True)
            print(f"{'':12s}        last round: {profiles[mode].summary(variants[mode]['slots'])}", flush=True)
    clients.shutdown()
    for uv, thread, server in running:
        uv.should_exit = True
        thread.join(60)
        server.scheduler.stop(60)
    first, *others = variants
    for other in others:
        print(f"\n{first} / {other}:")
        for c in levels:
            a, b = results[(first, c)], results[(other, c)]
            print(f"  c={c:3d}  tokens/s x{a['tokens/s'] / b['tokens/s']:.2f}   p99 x{a['p99 s'] / b['p99 s']:.2f}"
                  " (lower is better)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
