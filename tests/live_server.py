"""Run an ASGI app with uvicorn on 127.0.0.1 in a background thread, for tests and benchmarks."""

from __future__ import annotations

import socket
import threading
import time

import uvicorn


def wait_for(condition, timeout: float, what: str):
    """`condition()`'s first truthy value, polled every 50 ms; fails with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, what
        time.sleep(0.05)
    return value


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LiveServer:
    """`with LiveServer(app) as server: server.url` — started on a free loopback port, stopped on exit.

    Without a `port`, the listening socket is bound here (port 0: the kernel's pick) and handed to uvicorn, so
    no other process (another pytest-xdist worker, a parallel run) can take the port between its choice and
    its use, as it could with `free_port()`."""

    def __init__(self, app, port: int | None = None, log_level: str = "warning", **config_options):
        self.socket = None
        if port is None:
            self.socket = socket.socket()
            self.socket.bind(("127.0.0.1", 0))
            port = self.socket.getsockname()[1]
        self.port = port
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(
            app, host="127.0.0.1", port=self.port, log_level=log_level, lifespan="on", **config_options
        )
        self.server = uvicorn.Server(config)
        sockets = [self.socket] if self.socket else None
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": sockets}, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        if self.socket is not None:
            self.socket.close()
