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
