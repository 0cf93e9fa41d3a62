"""Issue 21 row 7 and 10, from the attacker's review: what a stranger sends never writes a traceback, every
line it causes is short, and no page session id reaches the log.

A live `app.build_app` on loopback; raw sockets for bodies that never arrive whole (hang-ups, broken chunks),
httpx for Gradio's routes with names, inputs and queue sessions that do not exist. Both the logging records
and the process's stderr (Gradio prints some tracebacks itself) are read.
"""

from __future__ import annotations

import logging
import socket

import httpx
import pytest
from conftest import HQ_ID
from live_server import LiveServer

import app
from segmentation.settings import Settings

MAX_LINE = 400  # characters: one short line per bad request


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.extend(logging.Formatter().format(record).splitlines())


@pytest.fixture(scope="module")
def server():
    with LiveServer(app.build_app(Settings(model=HQ_ID, preload_examples=False, device="cpu"))) as live:
        yield live


def _send_and_hang_up(port: int, head: str, body: bytes) -> None:
    """A request whose body never arrives whole: the connection closes mid-body."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(head.encode() + body)
        sock.shutdown(socket.SHUT_WR)
        sock.settimeout(10)
        try:
            while sock.recv(4096):
                pass
        except OSError:
            pass


def test_a_strangers_bad_requests_write_no_traceback_and_short_lines(server, capfd):
    records = _Records()
    root = logging.getLogger()
    root.addHandler(records)
    try:
        with httpx.Client(base_url=server.url, timeout=30) as http:
            sid = http.post("/ui/session").json()["session"]
            for path in ("/v1/images/segmentations", f"/ui/session/{sid}/op", f"/ui/session/{sid}/everything"):
                head = (
                    f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
                )
                _send_and_hang_up(server.port, head, b'{"op"')  # hung up after 5 of 1000 bytes
                chunked = f"POST {path} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                _send_and_hang_up(server.port, chunked, b"zz\r\nbroken\r\n")  # not a chunk size
            for name in ("run", "call", "api"):
                unknown = http.post(f"/gradio_api/{name}/nosuch", json={"data": []})
                assert unknown.status_code == 404, (name, unknown.status_code, unknown.text[:200])
            too_few = http.post("/gradio_api/run/segment", json={"data": []})
            assert 400 <= too_few.status_code < 500, too_few.text[:200]
            stream = http.get("/gradio_api/queue/data", params={"session_hash": "../../etc"})
            assert stream.status_code == 404 and stream.json()["error"]["code"] == "not_found"
            fn_index = next(
                d["id"] for d in http.get("/config").json()["dependencies"] if d.get("api_name") == "segment"
            )
            for i in range(3):  # the event's own error goes to its caller, not a traceback to the log
                joined = http.post(
                    "/gradio_api/queue/join",
                    json={"data": ["x", "[[[1,1]]]", None, None, None], "fn_index": fn_index, "session_hash": f"h{i}"},
                )
                assert joined.status_code == 200
                with http.stream("GET", "/gradio_api/queue/data", params={"session_hash": f"h{i}"}) as events:
                    text = ""
                    for chunk in events.iter_text():
                        text += chunk
                        if "process_completed" in text:
                            break
                assert "not valid base64" in text
            long_path = http.get("/ui/" + "a" * 60_000)
            assert long_path.status_code == 404
            assert http.get("/v1/models").status_code == 200  # still answering
            http.delete(f"/ui/session/{sid}")
    finally:
        root.removeHandler(records)
    printed = capfd.readouterr()
    lines = records.lines + (printed.out + printed.err).splitlines()
    assert not [line for line in lines if "Traceback" in line], "\n".join(lines)[-3000:]
    assert not [line for line in lines if sid in line], "a session id was logged"
    long_lines = [line[:120] for line in lines if len(line) > MAX_LINE]
    assert not long_lines, long_lines
