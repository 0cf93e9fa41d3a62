"""Issue 21 row 2, round 4: request bodies in flight are bounded per client and in total, tried from the
outside: raw sockets, from two loopback addresses, against a live server of the ASGI guard in front of a
route that reads its body into memory (as `/v1/images/segmentations` does). Waits are on conditions."""

from __future__ import annotations

import select
import socket
import time

import httpx
import pytest
from live_server import LiveServer
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from segmentation.guard import RequestGuard
from segmentation.limits import Limits

MiB = 2**20
CAP = 4 * MiB  # the body cap: 2 x CAP in flight per client
TOTAL = 10 * MiB  # all clients together
A, B, C = "127.0.0.2", "127.0.0.3", "127.0.0.4"  # three clients (Linux answers all of 127/8 on loopback)


async def read_body(request: Request) -> JSONResponse:
    return JSONResponse({"bytes": len(await request.body())})


@pytest.fixture(scope="module")
def guarded():
    inner = Starlette(routes=[Route("/v1/echo", read_body, methods=["POST"])])
    limits = Limits(max_body_bytes=CAP, body_timeout=30.0, body_deadline=60.0)
    with LiveServer(RequestGuard(inner, limits, bodies_bytes=TOTAL)) as live:
        yield live


def unfinished(live, source: str, length: int, sent: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", live.port), timeout=30, source_address=(source, 0))
    sock.sendall(f"POST /v1/echo HTTP/1.1\r\nHost: x\r\nContent-Length: {length}\r\n\r\n".encode() + b"\0" * sent)
    return sock


def answered(sockets: list[socket.socket], timeout: float) -> dict[int, bytes]:
    """The sockets (by index) the server answered and closed within `timeout`, with what it said."""
    answers: dict[int, bytes] = {}
    deadline = time.monotonic() + timeout
    waiting = list(range(len(sockets)))
    while waiting and time.monotonic() < deadline:
        ready, _, _ = select.select([sockets[i] for i in waiting], [], [], 0.5)
        if not ready and answers:  # the refusal came; the others are still being read
            break
        for sock in ready:
            i = sockets.index(sock)
            data = b""
            try:
                while chunk := sock.recv(65536):
                    data += chunk
            except ConnectionResetError:
                pass
            answers[i] = data
            waiting.remove(i)
    return answers


def whole_body_passes(live, source: str, size: int, deadline_s: float = 10) -> int:
    """Post a whole body until it is served (the bytes of ended requests are released), the last status."""
    deadline, status = time.monotonic() + deadline_s, 0
    transport = httpx.HTTPTransport(local_address=source)
    with httpx.Client(base_url=live.url, transport=transport, timeout=30) as http:
        while time.monotonic() < deadline:
            status = http.post("/v1/echo", content=b"\0" * size).status_code
            if status == 200:
                break
            time.sleep(0.05)
    return status


def test_row2_bodies_in_flight_from_one_client_past_twice_the_cap_get_429_and_others_go_on(guarded):
    sockets = [unfinished(guarded, A, CAP, CAP - 64 * 1024) for _ in range(3)]  # 3 x ~4 MiB > 8 MiB
    try:
        answers = answered(sockets, timeout=10)
        assert len(answers) == 1, f"exactly one of the three is refused, got {answers}"
        (answer,) = answers.values()
        assert answer.startswith(b"HTTP/1.1 429") and b"too_many_bodies" in answer, answer[:300]
        # another client is not held back by A's bodies
        assert whole_body_passes(guarded, B, 2 * MiB) == 200
    finally:
        for sock in sockets:
            sock.close()
    assert whole_body_passes(guarded, A, 3 * MiB) == 200, "A's bytes are released when its requests end"


def test_row2_bodies_in_flight_from_all_clients_past_the_budget_get_503(guarded):
    sockets = [unfinished(guarded, source, CAP, 3 * MiB) for source in (A, B, C, A)]  # 12 MiB > 10 MiB
    try:
        answers = answered(sockets, timeout=10)
        assert len(answers) == 1, f"exactly one of the four is refused, got {answers}"
        (answer,) = answers.values()
        assert answer.startswith(b"HTTP/1.1 503") and b"server_busy" in answer, answer[:300]
    finally:
        for sock in sockets:
            sock.close()
    assert whole_body_passes(guarded, C, 3 * MiB) == 200, "the bytes are released when the requests end"
