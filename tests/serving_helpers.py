"""A serving.server on loopback for the tests: a free port, an in-thread uvicorn, a health wait."""
from __future__ import annotations

import socket
import threading
import time

import requests


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, seconds: float = 120) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            if requests.get(url + "/health", timeout=2).status_code == 200:
                return
        except requests.ConnectionError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"server at {url} did not come up in {seconds}s")


def start_in_thread(server):
    """(uvicorn server, its thread, base URL) of `server.app` on a free loopback port; stop it with
    `uv.should_exit = True; thread.join()`."""
    import uvicorn
    port = free_port()
    uv = uvicorn.Server(uvicorn.Config(server.app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    wait_healthy(url)
    return uv, thread, url


VOCAB = 320     # the tiny tokenizer's size, and the served model's vocabulary


def tiny_served_model(root) -> dict:
    """A random tiny model's params.yaml, model, checkpoint and a tokenizer that fits it, under root:
    what the serving tests (serving.server, serving.triton) serve."""
    from tests.data_helpers import make_tiny_tokenizer
    from tests.runtime_helpers import saved_random_model
    params, model, checkpoint = saved_random_model(root, 5, vocab_size=VOCAB, max_position_embeddings=96)
    tokenizer = make_tiny_tokenizer(str(root / "tok"), vocab_size=VOCAB)
    return {"root": root, "model": model, "checkpoint": checkpoint, "tokenizer": tokenizer, "params": params,
            "tokenizer_dir": str(root / "tok")}


def slot_test_config():
    """The 2-layer d=32 model the slot and beam tests decode with (its logits sum ~32-64 terms of size ~1)."""
    from config.params import ModelParams
    return ModelParams(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_heads=4, rotary_dim=4,
                       filter_size=64, max_position_embeddings=128)
