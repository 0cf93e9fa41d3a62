"""Issue 11, tried as a stranger would: raw HTTP against a live server of the real app (`app.build_app`).

One test per threat row of docs/RELIABILITY.md that the server side answers (rows 3-6, 8, 10-14);
the page's rows (1, 2, 7, 9) are tested with the page.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import multiprocessing
import resource
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from api_fixtures import png_b64
from conftest import HQ_ID, make_picture
from fastapi import FastAPI
from live_server import LiveServer
from PIL import Image

from segmentation import Segmenter
from segmentation.api import install_api
from segmentation.service import ModelRegistry
from segmentation.settings import Settings

URL = "/v1/images/segmentations"
KEY = "k-stranger-test"
MiB = 2**20


def _settings(**overrides) -> Settings:
    return Settings(model=HQ_ID, device="cpu", preload_examples=False, **overrides)


@pytest.fixture(scope="module")
def open_server():
    import app as app_module

    with LiveServer(app_module.build_app(_settings())) as server:
        yield server


@pytest.fixture(scope="module")
def keyed_server():
    import app as app_module

    with LiveServer(app_module.build_app(_settings(api_keys=(KEY,)))) as server:
        yield server


def _request(picture_b64: str, prompt, **extra) -> dict:
    return {"model": HQ_ID, "image_prompt": picture_b64, "segment_prompt": prompt, **extra}


def _raw_headers_only(server: LiveServer, method: str, path: str, length: int, headers: str = "") -> tuple[int, bytes]:
    """Send only the request line and headers (announcing `length` body bytes that never come):
    the status that comes back proves the server answered without reading the body."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=15) as sock:
        sock.sendall(
            f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {length}\r\n{headers}\r\n".encode()
        )
        answer = b""
        while b"\r\n\r\n" not in answer:
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
    return int(answer.split(b" ", 2)[1]), answer


def _flat_png_b64(width: int, height: int, seed: int = 0) -> str:
    """A large picture that compresses to a small body: two flat shapes on a flat ground."""
    picture = Image.new("RGB", (width, height), (90 + seed % 50, 100, 110))
    picture.paste((230, 30, 30), (width // 5, height // 5, width // 2, height // 2))
    picture.paste((20, 40, 220), (width // 2, height // 2, width * 4 // 5, height * 4 // 5))
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def _error(response: httpx.Response) -> dict:
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and "Traceback" not in response.text
    return error


# ---- row 3: keys ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "method, path",
    [
        ("POST", URL),
        ("GET", "/v1/models"),
        ("POST", "/authentication/validate"),
        ("POST", "/gradio_api/call/segment"),
        ("POST", "/gradio_api/call/v2/segment"),
        ("POST", "/gradio_api/run/segment"),
        ("POST", "/gradio_api/api/segment"),
    ],
)
def test_row3_a_keyless_stranger_gets_401_on_every_programmatic_route_before_the_body_is_read(
    keyed_server, method, path
):
    status, answer = _raw_headers_only(keyed_server, method, path, 100 * MiB)  # 100 MiB announced, none sent
    assert status == 401, answer
    status, _ = _raw_headers_only(keyed_server, method, path, 100 * MiB, "Authorization: Bearer wrong\r\n")
    assert status == 401
    with httpx.Client(base_url=keyed_server.url, timeout=60) as client:
        ok = {"Authorization": f"Bearer {KEY}"}
        assert client.get("/v1/models", headers=ok).status_code == 200
        assert client.post(URL, json=_request(png_b64(), [[[5, 5]]]), headers=ok).status_code == 200
        assert client.get("/").status_code == 200  # the UI stays public (README says how to protect it)


# ---- rows 4 and 5: what one request may cost -------------------------------------------------------


def _rss_high_water_reset() -> int:
    """Reset this process's peak resident memory (Linux) and return the current resident bytes."""
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")
    return _status_kib("VmRSS") * 1024


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(field)


def test_row4_255_one_point_objects_are_answered_within_the_memory_bound_or_refused(open_server):
    prompt = [[[float(i % 100), float(i // 100)]] for i in range(255)]
    big = _flat_png_b64(8000, 5000, seed=4)  # 40 megapixels
    small = png_b64(make_picture(1000, 1000, seed=5))
    with httpx.Client(base_url=open_server.url, timeout=300) as client:
        start = time.monotonic()
        refused = client.post(URL, json=_request(big, prompt, n=3))
        assert refused.status_code == 400, refused.text
        assert _error(refused)["code"] == "too_much_work" and time.monotonic() - start < 20
        idle = _rss_high_water_reset()
        served = client.post(URL, json=_request(small, prompt, n=3))
        peak = _status_kib("VmHWM") * 1024
    assert served.status_code == 200, served.text
    assert len(served.json()["data"]) == 3 and len(served.json()["data"][0]["segments"]) == 255
    assert peak - idle < 1024 * MiB, f"peak {(peak - idle) / MiB:.0f} MiB above idle"


def test_row5_a_huge_size_is_refused_and_the_largest_allowed_one_stays_bounded(open_server):
    one_pixel = png_b64(make_picture(1, 1))
    prompt = [[[0, 0]]] * 13
    with httpx.Client(base_url=open_server.url, timeout=300) as client:
        refused = client.post(URL, json=_request(one_pixel, prompt, n=3, size="16384x16384"))
        assert refused.status_code == 400 and _error(refused)["param"] == "size"
        assert "268.4 megapixels; the limit is 40 megapixels" in _error(refused)["message"]
        idle = _rss_high_water_reset()
        served = client.post(URL, json=_request(one_pixel, prompt, n=3, size="8000x5000"))
        peak = _status_kib("VmHWM") * 1024
    assert served.status_code == 200, served.text
    assert peak - idle < 1024 * MiB, f"peak {(peak - idle) / MiB:.0f} MiB above idle"


# ---- row 6: the event loop never blocks ------------------------------------------------------------


def test_row6_models_answers_within_a_second_while_a_3_million_string_point_is_refused(open_server):
    hostile = b'{"model": "%s", "image_prompt": "aGk=", "segment_prompt": [[[%s]]]}' % (
        HQ_ID.encode(),
        b",".join([b'"a"'] * 3_000_000),
    )
    assert 10 * MiB < len(hostile) < 32 * MiB
    answer: dict = {}

    def send() -> None:
        start = time.monotonic()
        response = httpx.post(
            open_server.url + URL, content=hostile, headers={"Content-Type": "application/json"}, timeout=120
        )
        answer.update(status=response.status_code, seconds=time.monotonic() - start, error=response.json()["error"])

    thread = threading.Thread(target=send)
    latencies = []
    with httpx.Client(base_url=open_server.url, timeout=30) as client:
        thread.start()
        while thread.is_alive() or not latencies:
            start = time.monotonic()
            assert client.get("/v1/models").status_code == 200
            latencies.append(time.monotonic() - start)
        thread.join()
    assert answer["status"] == 422 and "segment_prompt[0][0][0]" in answer["error"]["message"], answer
    assert answer["seconds"] < 20, answer
    assert max(latencies) < 1.0, f"/v1/models took {max(latencies):.2f} s during the bad request"


# ---- row 8: body caps on every route ---------------------------------------------------------------


@pytest.mark.parametrize(
    "path", ["/gradio_api/call/segment", "/gradio_api/queue/join", "/ui/session/stranger/picture", URL]
)
def test_row8_a_body_over_the_cap_is_refused_on_every_route_without_being_read(open_server, path):
    status, answer = _raw_headers_only(open_server, "POST", path, 120 * MiB)
    assert status == 413, answer
    sent = {"bytes": 0}
    upload = "picture" in path
    boundary = "stranger"
    content_type = f"multipart/form-data; boundary={boundary}" if upload else "application/json"

    def chunks():  # no Content-Length: streamed until the server stops reading
        if upload:  # a file part that never ends, as Gradio's upload route expects it
            yield f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="a.png"\r\n\r\n'.encode()
        for _ in range(120):
            sent["bytes"] += MiB
            yield b"x" * MiB

    with httpx.Client(base_url=open_server.url, timeout=60) as client:
        try:
            response = client.post(path, content=chunks(), headers={"Content-Type": content_type})
            # a route that does not exist (or an unknown session) may answer first: it does not read either
            assert response.status_code in (413, 404, 403, 400), response.text
        except httpx.TransportError:
            pass  # the server answered and closed while the client was still sending
    assert sent["bytes"] < 120 * MiB
    with httpx.Client(base_url=open_server.url, timeout=60) as client:
        assert client.get("/v1/models").status_code == 200


# ---- row 10: `user` ----------------------------------------------------------------------------------


def test_row10_user_is_bounded_and_logged_short_and_escaped_only_after_validation(open_server, caplog):
    with caplog.at_level(logging.INFO, logger="segmentation.api"), httpx.Client(base_url=open_server.url) as client:
        long_user = "x" * (1 * MiB)
        response = client.post(URL, json=_request(png_b64(), [[[5, 5]]], user=long_user), timeout=60)
        assert response.status_code == 422 and _error(response)["param"] == "user"
        rejected = client.post(URL, json=_request(png_b64(), [[[500, 5]]], user="refused-user"), timeout=60)
        assert rejected.status_code == 400
        sneaky = "evil\nFAKE LOG LINE \x1b[31m" + "y" * 200
        assert client.post(URL, json=_request(png_b64(), [[[5, 5]]], user=sneaky), timeout=60).status_code == 200
    logged = [record.getMessage() for record in caplog.records if "user" in record.getMessage()]
    assert not any("xxxxxxxxxx" in line or "refused-user" in line for line in logged)
    (line,) = [line for line in logged if "evil" in line]
    assert "\n" not in line and "\x1b" not in line and len(line) < 200


# ---- row 11: picture formats ----------------------------------------------------------------------


def test_row11_postscript_and_other_unlisted_formats_are_refused_with_a_clear_400(open_server):
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nnewpath 0 0 moveto 10 10 lineto stroke\nshowpage\n"
    buffer = io.BytesIO()
    Image.fromarray(make_picture(32, 32)).save(buffer, format="ICO")
    with httpx.Client(base_url=open_server.url, timeout=60) as client:
        for data in (eps, buffer.getvalue()):
            response = client.post(URL, json=_request(base64.b64encode(data).decode(), [[[1, 1]]]))
            assert response.status_code == 400, response.text
            error = _error(response)
            assert error["code"] == "unsupported_image_format" and "JPEG, PNG, WebP" in error["message"]


# ---- row 12: coordinates and validation before the encoder -------------------------------------------


def _counting_loader(calls: list):
    def load(name, **kwargs):
        segmenter = Segmenter.from_pretrained(name, **kwargs)
        original = segmenter._encode_unlocked

        def counted(rgb, key):
            calls.append(key)
            return original(rgb, key)

        segmenter._encode_unlocked = counted
        return segmenter

    return load


def test_row12_a_401_digit_coordinate_is_a_4xx_and_a_rejected_prompt_never_runs_the_encoder():
    calls: list = []
    settings = _settings()
    registry = ModelRegistry(settings, loader=_counting_loader(calls))
    app = FastAPI()
    install_api(app, registry, settings)
    picture = png_b64(make_picture(64, 48, seed=12))
    with LiveServer(app) as server, httpx.Client(base_url=server.url, timeout=60) as client:
        raw = json.dumps(_request(picture, [[[1, 1]]])).replace("[[[1, 1]]]", "[[[%s, 1]]]" % ("9" * 401))
        response = client.post(URL, content=raw, headers={"Content-Type": "application/json"})
        assert response.status_code == 422 and _error(response)["param"] == "segment_prompt"
        for prompt in ([[[64, 10]]], [[[10, 48]]], [[[-1, 0]]]):  # outside the 64x48 picture
            assert client.post(URL, json=_request(picture, prompt)).status_code == 400
        assert calls == [], "the encoder ran for a request whose prompt was refused"
        assert client.post(URL, json=_request(picture, [[[63, 47]]])).status_code == 200
        assert len(calls) == 1


# ---- row 13: out of memory on the CPU -------------------------------------------------------------------


def test_row13_a_real_cpu_allocator_failure_is_503_the_cache_is_shed_and_the_next_request_succeeds():
    """Run in a fresh interpreter: a process that ran other tests first (an xdist worker) may hold hundreds of MB
    its allocator freed but kept mapped, which the compose then reuses without new address space, so the limit
    on address space would not bite."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        pool.apply(_row13_in_this_process)  # re-raises the child's assertion


def _row13_in_this_process() -> None:
    settings = _settings()
    registry = ModelRegistry(settings)
    app = FastAPI()
    install_api(app, registry, settings)
    big = _flat_png_b64(6000, 6000, seed=13)  # 36 megapixels: composing its map needs ~300 MB
    small = png_b64(make_picture(64, 48, seed=14))
    with LiveServer(app) as server, httpx.Client(base_url=server.url, timeout=300) as client:
        assert client.post(URL, json=_request(big, [[[10, 10]]])).status_code == 200  # embedded and cached
        assert client.post(URL, json=_request(small, [[[10, 10]]])).status_code == 200
        assert len(registry.cache) == 2
        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        resource.setrlimit(resource.RLIMIT_AS, (_status_kib("VmSize") * 1024 + 96 * MiB, hard))
        try:
            response = client.post(URL, json=_request(big, [[[10, 10]]]))  # a cache hit: only the compose allocates
        finally:
            resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
        assert response.status_code == 503, response.text
        assert _error(response)["code"] == "resource_exhausted" and response.headers["retry-after"]
        assert len(registry.cache) == 1  # the older half was shed
        assert client.post(URL, json=_request(big, [[[10, 10]]])).status_code == 200


# ---- row 14: abandoned requests ----------------------------------------------------------------------


def test_row14_requests_whose_client_left_are_dropped_and_a_new_one_is_served_at_once():
    calls: list = []
    delay = 1.0

    def slow_loader(name, **kwargs):
        segmenter = _counting_loader(calls)(name, **kwargs)
        counted = segmenter._encode_unlocked

        def slow(rgb, key):
            time.sleep(delay)  # a slow encoder, as ViT-B is on a CPU
            return counted(rgb, key)

        segmenter._encode_unlocked = slow
        return segmenter

    settings = _settings(max_queue=16)
    registry = ModelRegistry(settings, loader=slow_loader)
    app = FastAPI()
    install_api(app, registry, settings)
    pictures = [png_b64(make_picture(64, 48, seed=1400 + i)) for i in range(21)]
    with LiveServer(app) as server:
        registry.get()

        def hang_up(picture: str) -> None:
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(server.url + URL, json=_request(picture, [[[5, 5]]]), timeout=0.3)

        with ThreadPoolExecutor(20) as pool:
            list(pool.map(hang_up, pictures[:20]))
        start = time.monotonic()
        with httpx.Client(base_url=server.url, timeout=120) as client:
            response = client.post(URL, json=_request(pictures[20], [[[5, 5]]]))
        seconds = time.monotonic() - start
    assert response.status_code == 200, response.text
    # Without dropping, the 20 abandoned encodes (one at a time) come first: 20 s. With it, only those
    # admitted before their client left run (4 at once, plus any that reached the front within 0.3 s).
    assert seconds < 10 * delay, f"the new request waited {seconds:.1f} s behind abandoned ones"
    assert len(calls) <= 10, f"{len(calls) - 1} abandoned requests still ran the encoder"
