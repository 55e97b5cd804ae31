"""serving.server on loopback: bursts equal single-request results, bad requests get 4xx, a
client leaving mid-stream frees its slot, SIGTERM drains. Bounded: a few dozen requests, tiny model."""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests

from generation.config import GenerationConfig
from generation.generator import Generator
from serving.server import Limits, build_server
from tests.serving_helpers import VOCAB, free_port, start_in_thread, tiny_served_model, wait_healthy

# max_beams 5 > the fixture's 4 slots: a request for 5 beams passes the limit and is refused for slots
LIMITS = Limits(max_prompt_tokens=40, max_tokens=24, max_n=3, max_beams=5, request_timeout=60)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return tiny_served_model(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module", params=["continuous", "static"])
def served(request, setup):
    server = build_server(setup["model"], setup["tokenizer"], slots=4, batching=request.param, limits=LIMITS,
                          max_wait=0.05, compile_mode="graph")
    uv, thread, url = start_in_thread(server)
    yield server, url
    uv.should_exit = True
    thread.join(30)


def expected_tokens(setup, prompt_ids, config: GenerationConfig, seed: int = 0) -> list[int]:
    result = Generator(setup["model"], compile_mode="eager").generate([prompt_ids], config, seeds=[seed])[0]
    ids = result.token_ids
    return ids[:-1] if ids and ids[-1] in config.stop_token_ids else ids


def test_burst_all_answered_with_single_request_tokens(setup, served):
    server, url = served
    rng = np.random.default_rng(0)
    jobs = []
    for i in range(10):
        prompt = rng.integers(2, VOCAB, size=int(rng.integers(1, 40))).tolist()
        jobs.append({"prompt": prompt, "max_tokens": int(rng.integers(1, 25)), "temperature": 0})
    jobs.append({"prompt": "the cat sat", "max_tokens": 8, "temperature": 0.8, "top_k": 40, "seed": 9})
    jobs.append({"prompt": "model layer", "max_tokens": 6, "temperature": 0, "num_beams": 2})
    with ThreadPoolExecutor(len(jobs)) as pool:
        replies = list(pool.map(lambda body: requests.post(url + "/v1/completions", json=body, timeout=120), jobs))
    eos = setup["tokenizer"].eos_id
    for body, reply in zip(jobs, replies):
        assert reply.status_code == 200, reply.text
        prompt = body["prompt"] if isinstance(body["prompt"], list) else setup["tokenizer"].encode(body["prompt"])
        config = GenerationConfig(max_new_tokens=body["max_tokens"], do_sample=body["temperature"] > 0,
                                  temperature=body["temperature"] or 1.0, top_k=body.get("top_k", 0),
                                  num_beams=body.get("num_beams", 1), early_stopping=body.get("num_beams", 1) > 1,
                                  stop_token_ids=(eos,), pad_token_id=eos)
        choice = reply.json()["choices"][0]
        assert choice["token_ids"] == expected_tokens(setup, prompt, config, body.get("seed", 0)), body
        assert choice["text"] == setup["tokenizer"].decode(choice["token_ids"])
    metrics = requests.get(url + "/metrics").text
    assert 'gptj_requests_total{status="ok"}' in metrics and "gptj_batch_occupancy_bucket" in metrics


def test_stream_matches_the_whole_answer(setup, served):
    server, url = served
    body = {"prompt": "the cat", "max_tokens": 12, "temperature": 0}
    whole = requests.post(url + "/v1/completions", json=body, timeout=60).json()["choices"][0]
    with requests.post(url + "/v1/completions", json={**body, "stream": True}, stream=True, timeout=60) as reply:
        lines = [line for line in reply.iter_lines(decode_unicode=True) if line]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[len("data: "):]) for line in lines[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole["text"]
    assert chunks[-1]["choices"][0]["finish_reason"] == whole["finish_reason"]


@pytest.mark.parametrize("body, status, param", [
    ('{"prompt": "x", "max_tokens": ', 400, None),                       # malformed JSON
    ({"prompt": "x", "max_tokens": "5"}, 400, "max_tokens"),             # wrong type
    ({"prompt": 5}, 400, "prompt"),
    ({"prompt": list(range(2, 60))}, 400, "prompt"),                     # over --max-prompt-tokens
    ({"prompt": "x", "n": 9, "temperature": 1}, 400, "n"),
    ({"prompt": "x", "num_beams": 7}, 400, "num_beams"),
    ({"prompt": "x", "num_beams": 5, "temperature": 0}, 400, "num_beams"),   # more beams than slots
    ({"prompt": "x", "max_tokens": 500}, 400, "max_tokens"),
    ({"prompt": "x", "tempreature": 1}, 400, "tempreature"),             # unknown field
    ({"prompt": [VOCAB + 5]}, 400, None),                                # outside the vocabulary
])
def test_bad_requests_get_4xx_json_naming_the_field(served, body, status, param):
    server, url = served
    data = body if isinstance(body, str) else json.dumps(body)
    reply = requests.post(url + "/v1/completions", data=data, headers={"content-type": "application/json"},
                          timeout=30)
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert error["message"] and error["param"] == param
    if param:
        assert param in error["message"]
    if isinstance(body, dict) and body.get("num_beams") == 5:
        assert "num_beams=5" in error["message"] and "--max-batch 4" in error["message"]


def test_client_leaving_mid_stream_frees_its_slot(setup, served):
    server, url = served
    body = {"prompt": "the cat", "max_tokens": 24, "temperature": 0, "ignore_eos": True, "stream": True}
    reply = requests.post(url + "/v1/completions", json=body, stream=True, timeout=60)
    next(line for line in reply.iter_lines() if line)           # the first chunk arrived: it holds a slot
    reply.close()
    end = time.monotonic() + 20
    while time.monotonic() < end and server.scheduler.busy_rows:
        time.sleep(0.05)
    assert server.scheduler.busy_rows == 0
    assert requests.post(url + "/v1/completions", json={"prompt": "x", "max_tokens": 2}, timeout=60).status_code == 200


def test_sigterm_drains_in_flight_requests_and_refuses_new_ones(setup):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    argv = [sys.executable, "-m", "serving.server", "--params", setup["params"], "--checkpoint_path",
            setup["checkpoint"], "--tokenizer", setup["tokenizer_dir"], "--port", str(port), "--max-batch", "2",
            "--max-prompt-tokens", "40", "--max-tokens-limit", "24", "--compile", "graph"]
    process = subprocess.Popen(argv, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_healthy(url)
        body = {"prompt": "the cat", "max_tokens": 24, "temperature": 0, "ignore_eos": True}
        with ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(requests.post, url + "/v1/completions", json=body, timeout=120) for _ in range(4)]
            end = time.monotonic() + 30
            while time.monotonic() < end:                # all four accepted: two decoding, two queued
                health = requests.get(url + "/health").json()
                if health["busy_slots"] + health["queue_depth"] == 4:
                    break
                time.sleep(0.02)
            process.send_signal(signal.SIGTERM)
            replies = [f.result() for f in futures]
        assert [r.status_code for r in replies] == [200] * 4
        assert all(len(r.json()["choices"][0]["token_ids"]) == 24 for r in replies)
        # uvicorn re-raises the signal once drained, so the exit status says "ended by SIGTERM" (143 in a shell)
        assert process.wait(60) == -signal.SIGTERM
        with pytest.raises(requests.ConnectionError):
            requests.post(url + "/v1/completions", json=body, timeout=5)
    finally:
        if process.poll() is None:
            process.kill()


def test_a_coarser_prompt_bucket_compiles_fewer_prefills_and_answers_the_same(setup):
    """Prompts of 5 and 40 tokens compile prefills for buckets 32 and 64 with --prompt-bucket 32
    (the default), one for bucket 64 with --prompt-bucket 64; the greedy answers are the
    single-request tokens either way (left padding is masked), and the memory estimate counts
    the programs each may compile (LIMITS: prompts up to 40 tokens)."""
    from config.params import load_params
    from serving.server import memory_estimate
    prompts = [list(range(2, 7)), list(range(2, 42))]                    # 5 and 40 tokens
    config = GenerationConfig(max_new_tokens=6, stop_token_ids=(setup["tokenizer"].eos_id,),
                              pad_token_id=setup["tokenizer"].eos_id)
    compiled = {}
    for bucket in (32, 64):
        limits = dataclasses.replace(LIMITS, prompt_bucket=bucket)
        server = build_server(setup["model"], setup["tokenizer"], slots=2, limits=limits, compile_mode="graph")
        uv, thread, url = start_in_thread(server)
        try:
            for prompt in prompts:
                reply = requests.post(url + "/v1/completions", json={"prompt": prompt, "max_tokens": 6,
                                                                     "temperature": 0}, timeout=120)
                assert reply.status_code == 200, reply.text
                assert reply.json()["choices"][0]["token_ids"] == expected_tokens(setup, prompt, config)
            compiled[bucket] = sorted(server.scheduler.decoder._admit)
        finally:
            uv.should_exit = True
            thread.join(30)
    assert compiled == {32: [32, 64], 64: [64]}
    model_config = load_params(setup["params"]).model
    terms = {bucket: dict(memory_estimate(model_config, dataclasses.replace(LIMITS, prompt_bucket=bucket),
                                          2, "float32", "graph").terms) for bucket in (32, 64)}
    assert "1 more compiled prefills" in terms[32] and not any("more compiled" in t for t in terms[64])
