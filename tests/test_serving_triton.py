"""serving.triton: the gptj model's request handling on its own, then one `python -m serving.triton`
(one test, so one server start) on loopback queried with tritonclient over HTTP and gRPC: tokens equal the Generator's, malformed
requests get Triton's errors, the endpoints answer, SIGTERM stops it and frees its ports.
The server tests need the `triton` extra (make test installs it) and skip without it."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from generation.config import GenerationConfig
from generation.generator import Generator
from serving.triton_model import PAD_ID, GptjInference, Limits, RequestError
from tests.runtime_helpers import ROOT
from tests.serving_helpers import VOCAB, free_port, tiny_served_model

LIMITS = Limits(max_prompt_tokens=40, max_tokens=24, max_beams=3)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return tiny_served_model(tmp_path_factory.mktemp("triton"))


def expected(setup, prompt: list[int], max_tokens: int, temperature: float = 0.0, top_k: int = 0,
             num_beams: int = 1, seed: int = 0) -> list[int]:
    """What one request alone gets from the Generator (a final EOS dropped, as served)."""
    eos = setup["tokenizer"].eos_id
    config = GenerationConfig(max_new_tokens=max_tokens, do_sample=temperature > 0, temperature=temperature or 1.0,
                              top_k=top_k, num_beams=num_beams, early_stopping=num_beams > 1,
                              stop_token_ids=(eos,), pad_token_id=eos)
    ids = Generator(setup["model"], compile_mode="eager").generate([prompt], config, seeds=[seed])[0].token_ids
    return ids[:-1] if ids and ids[-1] == eos else ids


def column(value, dtype) -> np.ndarray:
    return np.array([[value]], dtype=dtype)


# ---- the model's request handling, without Triton ------------------------------------------------

def test_a_batch_of_requests_decodes_per_setting_and_answers_as_alone(setup):
    """Requests with the same settings share one Generator call (greedy rows of any seed too);
    each row's answer equals the request decoded alone; rows of one request keep their order."""
    generator = Generator(setup["model"], compile_mode="eager")
    calls = []
    generate = generator.generate
    generator.generate = lambda prompts, config, seeds: calls.append(len(prompts)) or generate(prompts, config, seeds)
    inference = GptjInference(generator, setup["tokenizer"], LIMITS)
    two_rows = np.array([[5, 9, 13], [40, 41, 42]], np.int32)
    requests = [
        {"token_ids": two_rows, "max_tokens": np.array([[6], [6]], np.int32), "seed": np.array([[1], [2]], np.int64)},
        {"text": column(b"the cat sat", np.bytes_), "max_tokens": column(6, np.int32)},
        {"token_ids": np.array([[7, 8]], np.int32), "max_tokens": column(5, np.int32),
         "temperature": column(0.8, np.float32), "top_k": column(20, np.int32), "seed": column(9, np.int64)},
    ]
    replies = inference(requests)
    assert sorted(calls) == [1, 3]                  # 3 greedy rows of max_tokens 6 together; the sampled row alone
    text_prompt = setup["tokenizer"].encode("the cat sat")
    wanted = [[expected(setup, [5, 9, 13], 6), expected(setup, [40, 41, 42], 6)], [expected(setup, text_prompt, 6)],
              [expected(setup, [7, 8], 5, temperature=0.8, top_k=20, seed=9)]]
    for reply, rows in zip(replies, wanted):
        assert reply["token_ids"].dtype == np.int32 and reply["token_ids"].shape[0] == len(rows)
        for got, ids, text in zip(reply["token_ids"], rows, reply["text"][:, 0]):
            assert [t for t in got if t != PAD_ID] == ids
            assert text.decode("utf-8") == setup["tokenizer"].decode(ids, skip_unknown=True)


@pytest.mark.parametrize("request_, message", [
    ({"max_tokens": column(4, np.int32)}, "exactly one of the inputs text"),
    ({"text": column(b"x", np.bytes_), "token_ids": np.array([[3]], np.int32)}, "exactly one of the inputs text"),
    ({"token_ids": np.array([[3, 4]], np.int32), "max_tokens": column(99, np.int32)}, "--max-tokens-limit"),
    ({"token_ids": np.array([list(range(2, 50))], np.int32)}, "--max-prompt-tokens"),
    ({"token_ids": np.array([[3]], np.int32), "num_beams": column(8, np.int32)}, "--max-beams"),
    ({"token_ids": np.array([[3], [4]], np.int32), "max_tokens": column(4, np.int32)}, "give [2, 1]"),
    ({"token_ids": np.array([[VOCAB + 3]], np.int32)}, "outside the model vocabulary"),
    ({"token_ids": np.array([[3]], np.int32), "top_p": column(0.0, np.float32)}, "top_p=0.0"),
    ({"text": column(b"\xff\xfe", np.bytes_)}, "not UTF-8"),
])
def test_a_request_it_cannot_serve_names_the_input(setup, request_, message):
    inference = GptjInference(Generator(setup["model"], compile_mode="eager"), setup["tokenizer"], LIMITS)
    with pytest.raises(RequestError, match="request 1 of this batch") as caught:
        inference([{"token_ids": np.array([[3]], np.int32)}, request_])
    assert message in str(caught.value)


# ---- python -m serving.triton on loopback -------------------------------------------------------

def test_the_stub_environment_must_hold_numpy_1():
    """This interpreter's own environment (NumPy 2, pyzmq from the extra) is refused as the stub's;
    the one make test creates is accepted."""
    pytest.importorskip("zmq", reason="the triton extra is not installed (make test installs it)")
    from pathlib import Path
    from serving.triton_env import TritonEnvError, check_stub_env, default_stub_env
    with pytest.raises(TritonEnvError, match="NumPy 2.* returns empty outputs under NumPy 2"):
        check_stub_env(Path(sys.prefix))
    assert check_stub_env(default_stub_env()).startswith("1.")


@pytest.fixture
def triton_server(setup):
    pytest.importorskip("pytriton", reason="the triton extra is not installed (make test installs it)")
    pytest.importorskip("tritonclient.http")
    pytest.importorskip("tritonclient.grpc")
    import tritonclient.http as http
    ports = {"http": free_port(), "grpc": free_port(), "metrics": free_port()}
    argv = [sys.executable, "-m", "serving.triton", "--params", setup["params"], "--checkpoint-path",
            setup["checkpoint"], "--tokenizer", setup["tokenizer_dir"], "--compile", "eager", "--max-batch", "4",
            "--max-queue-delay-ms", "50", "--max-prompt-tokens", "40", "--max-tokens-limit", "24", "--max-beams", "3",
            "--http-port", str(ports["http"]), "--grpc-port", str(ports["grpc"]), "--metrics-port", str(ports["metrics"])]
    log = open(os.path.join(os.path.dirname(setup["params"]), "triton.log"), "w+")
    process = subprocess.Popen(argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    end = time.monotonic() + 180
    while True:
        try:
            if ask(http, f"127.0.0.1:{ports['http']}", "is_model_ready", "gptj"):
                break
        except Exception:           # not listening yet
            pass
        if process.poll() is not None or time.monotonic() > end:
            log.seek(0)
            process.kill()
            raise AssertionError(f"serving.triton did not come up (exit {process.poll()}):\n{log.read()[-4000:]}")
        time.sleep(0.3)
    yield {"process": process, "ports": ports, "log": log}
    if process.poll() is None:
        process.kill()
        process.wait(30)
    log.close()


def infer(module, url: str, inputs: dict[str, np.ndarray]):
    """One request on a client of its own, closed after it: an open keep-alive connection holds
    Triton's shutdown for its exit timeout."""
    tensors = []
    for name, value in inputs.items():
        tensor = module.InferInput(name, list(value.shape), "BYTES" if value.dtype.kind in "SO" else
                                   {np.int32: "INT32", np.int64: "INT64", np.float32: "FP32"}[value.dtype.type])
        tensor.set_data_from_numpy(value)
        tensors.append(tensor)
    client = module.InferenceServerClient(url)
    try:
        return client.infer("gptj", tensors)
    finally:
        client.close()


def ask(module, url: str, question: str, *args) -> bool:
    client = module.InferenceServerClient(url)
    try:
        return getattr(client, question)(*args)
    finally:
        client.close()


def test_triton_serves_over_http_and_grpc_and_stops_on_sigterm(setup, triton_server):
    """One server for every check (a test each would let pytest-xdist start one per worker)."""
    check_answers_equal_the_generator(setup, triton_server)
    check_health_metrics_and_malformed_requests(triton_server)
    check_sigterm_stops_triton_and_frees_its_ports(triton_server)


def check_answers_equal_the_generator(setup, triton_server):
    """Concurrent requests (the dynamic batcher joins some) over both protocols: greedy, sampled
    and beam rows get the tokens of the Generator run on each alone, and text that decodes them."""
    import tritonclient.grpc as grpc
    import tritonclient.http as http
    ports = triton_server["ports"]
    urls = {http: f"127.0.0.1:{ports['http']}", grpc: f"127.0.0.1:{ports['grpc']}"}
    rng = np.random.default_rng(0)
    jobs = []
    for i in range(8):
        prompt = rng.integers(2, VOCAB, size=int(rng.integers(1, 12))).tolist()
        jobs.append((http if i % 2 else grpc, prompt, {"max_tokens": 4 + 4 * (i % 2)}))   # 2 decoders to compile
    jobs.append((grpc, [17, 18, 19], {"max_tokens": 7, "temperature": 0.7, "top_k": 30, "seed": 4}))
    jobs.append((http, [23, 24], {"max_tokens": 6, "num_beams": 2}))
    jobs.append((http, "the cat sat", {"max_tokens": 9}))

    def send(job):
        module, prompt, settings = job
        inputs = ({"text": column(prompt.encode(), np.object_)} if isinstance(prompt, str)
                  else {"token_ids": np.array([prompt], np.int32)})
        for name, value in settings.items():
            inputs[name] = column(value, {"temperature": np.float32, "seed": np.int64}.get(name, np.int32))
        return infer(module, urls[module], inputs)

    with ThreadPoolExecutor(len(jobs)) as pool:
        replies = list(pool.map(send, jobs))
    for (module, prompt, settings), reply in zip(jobs, replies):
        ids = setup["tokenizer"].encode(prompt) if isinstance(prompt, str) else prompt
        want = expected(setup, ids, settings["max_tokens"], settings.get("temperature", 0.0), settings.get("top_k", 0),
                        settings.get("num_beams", 1), settings.get("seed", 0))
        got = reply.as_numpy("token_ids")
        assert got.shape[0] == 1 and [t for t in got[0] if t != PAD_ID] == want, (module.__name__, prompt, settings)
        assert reply.as_numpy("text")[0, 0].decode("utf-8") == setup["tokenizer"].decode(want, skip_unknown=True)


def check_health_metrics_and_malformed_requests(triton_server):
    """Triton's own health and metrics endpoints answer; a request Triton's checks refuse (a wrong
    data type) and one the model refuses (two prompts) both come back as Triton errors."""
    import requests
    import tritonclient.grpc as grpc
    import tritonclient.http as http
    from tritonclient.utils import InferenceServerException
    ports = triton_server["ports"]
    url_http, url_grpc = f"127.0.0.1:{ports['http']}", f"127.0.0.1:{ports['grpc']}"
    assert ask(http, url_http, "is_server_live") and ask(grpc, url_grpc, "is_server_ready")
    assert ask(grpc, url_grpc, "is_model_ready", "gptj")
    with requests.get(f"http://{url_http}/v2/health/ready", timeout=10) as reply:
        assert reply.status_code == 200
    infer(http, url_http, {"token_ids": np.array([[3, 4]], np.int32), "max_tokens": column(2, np.int32)})
    with requests.get(f"http://127.0.0.1:{ports['metrics']}/metrics", timeout=10) as reply:
        metrics = reply.text
    success = [line for line in metrics.splitlines() if line.startswith("nv_inference_request_success{")
               and 'model="gptj"' in line]
    assert success and float(success[0].split()[-1]) >= 1
    for module, url in ((http, url_http), (grpc, url_grpc)):
        with pytest.raises(InferenceServerException, match="data-type is 'FP32', but model 'gptj' expects 'INT32'"):
            infer(module, url, {"token_ids": np.array([[3.0, 4.0]], np.float32)})
        with pytest.raises(InferenceServerException, match="exactly one of the inputs text"):
            infer(module, url, {"token_ids": np.array([[3]], np.int32), "text": column(b"x", np.object_)})
    # the server still answers after the errors
    reply = infer(grpc, url_grpc, {"token_ids": np.array([[3, 4]], np.int32), "max_tokens": column(2, np.int32)})
    assert reply.as_numpy("token_ids").shape[0] == 1


def check_sigterm_stops_triton_and_frees_its_ports(triton_server):
    import psutil
    process = triton_server["process"]
    children = psutil.Process(process.pid).children(recursive=True)
    assert any("tritonserver" in c.name() for c in children)
    process.send_signal(signal.SIGTERM)
    assert process.wait(60) == 0
    gone, alive = psutil.wait_procs(children, timeout=30)
    assert not alive, [c.name() for c in alive]
    for port in triton_server["ports"].values():
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", port)) != 0, f"port {port} still accepts connections"
