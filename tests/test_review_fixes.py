"""Issue 21's review fixes, tried from the outside (raw HTTP against a live server of the real app behind a
named proxy on loopback): client identities that one host cannot multiply, pictures too thin for the model
refused before decoding, and tiny pictures that get masks of their own size."""

from __future__ import annotations

import base64
import io

import httpx
import numpy as np
import pytest
from conftest import HQ_ID, make_picture
from live_server import LiveServer
from PIL import Image

import app
from segmentation.clients import ClientIdentity, client_key
from segmentation.errors import InvalidImageError
from segmentation.images import load_image, upright_size
from segmentation.limits import MAX_ASPECT, check_picture_shape
from segmentation.settings import Settings

URL = "/v1/images/segmentations"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    with pytest.MonkeyPatch.context() as env:
        env.setenv("SAMHQ_TRUSTED_PROXIES", "127.0.0.1")
        env.setenv("SAMHQ_UI_SESSIONS_DIR", str(tmp_path_factory.mktemp("sessions")))
        application = app.build_app(Settings(model=HQ_ID, preload_examples=False, device="cpu"))
    with LiveServer(application, forwarded_allow_ips=[]) as live:
        yield live, application


def png(width: int, height: int, mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    if mode == "1":
        Image.new("1", (width, height)).save(buffer, "PNG", optimize=True)
    else:
        Image.fromarray(make_picture(width, height, seed=width * 7 + height)).save(buffer, "PNG")
    return buffer.getvalue()


# ---- 1: one host is one client --------------------------------------------------------------------------


def scope(peer: str, forwarded: str | None = None) -> dict:
    headers = [(b"x-forwarded-for", forwarded.encode())] if forwarded is not None else []
    return {"client": (peer, 1234), "headers": headers}


def test_client_key_normalises_every_spelling_of_one_host():
    assert client_key("9.9.9.4") == "9.9.9.4"
    assert client_key("::ffff:9.9.9.4") == "9.9.9.4"  # IPv4-mapped IPv6 is the IPv4 host
    one_host = {"2001:db8::c", "2001:DB8::C", "2001:db8::1", "2001:db8:0:0:ffff::7", "fe80::1%eth0"}
    assert {client_key(a) for a in one_host - {"fe80::1%eth0"}} == {"2001:db8::/64"}  # IPv6: its /64
    assert client_key("fe80::1%eth0") == "fe80::/64"
    assert client_key("2001:db8:0:1::c") == "2001:db8:0:1::/64"  # the next /64 is another client
    assert client_key("testclient") == "testclient"  # not an address: only the server puts such a name there


def test_forwarded_hops_are_parsed_and_a_malformed_one_is_not_trusted():
    proxies = ClientIdentity("10.0.0.0/8, 127.0.0.1")
    for hop in ("2001:db8::c", "2001:DB8::C", "[2001:db8::c]:443", "[2001:db8::d]", "2001:db8::ffff"):
        assert proxies.of(scope("10.1.2.3", hop)) == "2001:db8::/64", hop
    for hop in ("9.9.9.4", "::ffff:9.9.9.4", "9.9.9.4:8080", "[::ffff:9.9.9.4]:1"):
        assert proxies.of(scope("10.1.2.3", hop)) == "9.9.9.4", hop
    for junk in (
        "junk1",
        "09.9.9.4",
        "9.9.9.4:port",
        "9.9.9.4:123456",
        "[2001:db8::c",
        "[2001:db8::c]x",
        "::ffff:09.9.9.4",
    ):
        assert proxies.of(scope("10.1.2.3", junk)) == "10.1.2.3", junk  # the proxy's own address
    assert proxies.of(scope("10.1.2.3", "6.6.6.6, junk, 10.9.9.9")) == "10.1.2.3"  # the walk stops at junk
    assert proxies.of(scope("::ffff:10.1.2.3", "9.9.9.4")) == "9.9.9.4"  # a mapped proxy address is the proxy
    assert proxies.of(scope("2001:db8::5", "9.9.9.4")) == "2001:db8::/64"  # not a proxy: its header is ignored
    assert ClientIdentity("").of(scope("2001:db8::5")) == "2001:db8::/64"


def test_one_ipv6_host_through_the_proxy_gets_one_share_of_sessions(served):
    """Raw HTTP through the named proxy: eight spellings of hosts in one /64 hold one client's share; the
    ninth is a 429, while the next /64 and a junk header (the proxy's own share) are other clients."""
    live, application = served
    per_client = application.state.page.store.per_client
    spellings = ["2001:db8:7::c", "2001:DB8:7::C", "[2001:db8:7::c]:443", "2001:db8:7::1", "2001:db8:7:0:a::b"]
    opened = []
    with httpx.Client(base_url=live.url, timeout=60) as http:
        try:
            answers = []
            for i in range(per_client + 2):
                answer = http.post("/ui/session", headers={"X-Forwarded-For": spellings[i % len(spellings)]})
                answers.append(answer.status_code)
                if answer.status_code == 200:
                    opened.append(answer.json()["session"])
            assert answers == [200] * per_client + [429, 429], answers
            other = http.post("/ui/session", headers={"X-Forwarded-For": "2001:db8:7:1::c"})
            assert other.status_code == 200, other.text
            opened.append(other.json()["session"])
            mapped = [http.post("/ui/session", headers={"X-Forwarded-For": a}) for a in ("::ffff:9.9.9.4", "9.9.9.4")]
            assert [m.status_code for m in mapped] == [200, 200]
            opened += [m.json()["session"] for m in mapped]
            junk = [http.post("/ui/session", headers={"X-Forwarded-For": f"junk{i}"}) for i in range(per_client + 1)]
            opened += [j.json()["session"] for j in junk if j.status_code == 200]
            assert [j.status_code for j in junk] == [200] * per_client + [429]  # all the proxy's own share
        finally:
            for sid in opened:
                http.delete(f"/ui/session/{sid}")


# ---- 2: a picture too thin for the model ------------------------------------------------------------------


def test_the_shape_rule_allows_up_to_max_aspect_and_tiny_squares():
    for width, height in [(1, 1), (2, 2), (2, 3), (5, 3), (MAX_ASPECT, 1), (1, MAX_ASPECT), (6400, 100)]:
        check_picture_shape(width, height)
    for width, height in [(MAX_ASPECT + 1, 1), (1, MAX_ASPECT + 1), (40_000_000, 1), (6401, 100)]:
        with pytest.raises(InvalidImageError, match="too thin for the model") as refused:
            check_picture_shape(width, height)
        assert refused.value.param == "image" and refused.value.code == "picture_too_thin"
    with pytest.raises(InvalidImageError, match="too thin"):
        load_image(np.zeros((1, 65, 3), np.uint8))  # arrays pass the same rule


@pytest.mark.parametrize("size", [(40_000_000, 1), (1, 40_000_000)])
def test_a_picture_too_thin_for_the_model_is_a_400_before_decoding(served, size):
    live, _ = served
    picture = png(*size, mode="1")
    width, height = size
    assert len(picture) < 1_000_000
    with pytest.raises(InvalidImageError, match=f"The picture is {width}×{height}: too thin for the model"):
        upright_size(picture)  # from the header
    with httpx.Client(base_url=live.url, timeout=60) as http:
        answer = http.post(
            URL, json={"model": HQ_ID, "image_prompt": base64.b64encode(picture).decode(), "segment_prompt": [[[0, 0]]]}
        )
        assert answer.status_code == 400, answer.text
        error = answer.json()["error"]
        assert f"The picture is {width}×{height}: too thin for the model" in error["message"], error
        assert error["param"] == "image_prompt" and error["code"] == "picture_too_thin", error
        sid = http.post("/ui/session", headers={"X-Forwarded-For": "192.0.2.77"}).json()["session"]
        try:
            upload = http.post(f"/ui/session/{sid}/picture", content=picture, headers={"X-Forwarded-For": "192.0.2.77"})
            assert upload.status_code == 400, upload.text
            assert "too thin for the model" in upload.text, upload.text
            fine = http.post(
                f"/ui/session/{sid}/picture", content=png(64, 1), headers={"X-Forwarded-For": "192.0.2.77"}
            )
            assert fine.status_code == 200, fine.text  # the session lost nothing and takes the next picture
        finally:
            http.delete(f"/ui/session/{sid}")


# ---- 3: tiny pictures get masks of their own size -----------------------------------------------------------


def test_tiny_pictures_get_masks_of_their_own_size(served):
    live, _ = served
    with httpx.Client(base_url=live.url, timeout=120) as http:
        for width, height in [(1, 1), (2, 2), (2, 3), (3, 2), (5, 3), (3, 5), (64, 1), (1, 64)]:
            answer = http.post(
                URL,
                json={
                    "model": HQ_ID,
                    "image_prompt": base64.b64encode(png(width, height)).decode(),
                    "segment_prompt": [[[0, 0]]],
                },
            )
            assert answer.status_code == 200, ((width, height), answer.text)
            mask = Image.open(io.BytesIO(base64.b64decode(answer.json()["data"][0]["b64_json"])))
            assert mask.size == (width, height), ((width, height), mask.size)


def test_tiny_pictures_on_the_page_take_a_click(served):
    live, _ = served
    client = {"X-Forwarded-For": "192.0.2.78"}
    with httpx.Client(base_url=live.url, timeout=120) as http:
        sid = http.post("/ui/session", headers=client).json()["session"]
        try:
            for width, height in [(1, 1), (2, 3), (64, 1)]:
                upload = http.post(f"/ui/session/{sid}/picture", content=png(width, height), headers=client)
                assert upload.status_code == 200, ((width, height), upload.text)
                clicked = http.post(f"/ui/session/{sid}/op", json={"op": "click", "x": 0, "y": 0})
                assert clicked.status_code == 200, ((width, height), clicked.text)
                download = http.get(f"/ui/session/{sid}/download/{clicked.json()['rev']}/mask.png")
                assert download.status_code == 200, download.text
                assert Image.open(io.BytesIO(download.content)).size == (width, height)
        finally:
            http.delete(f"/ui/session/{sid}")
