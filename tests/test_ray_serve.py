"""The API on Ray Serve, from the outside: a local Ray cluster (loopback, 2 CPUs) with 2 Segmenter replicas of
the tiny checkpoint, driven over raw HTTP through Ray's proxy and with the vendor SDK.

Skipped with the reason where ray[serve] is not installed (requirements-ray.txt) or Ray cannot start.
"""

from __future__ import annotations

import json
import subprocess
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from api_fixtures import build_api, png_b64
from conftest import HQ_ID, SAM_ID, make_picture
from live_server import LiveServer, free_port
from test_sdk import SCRIPT

ray = pytest.importorskip("ray", reason="ray[serve] is not installed (pip install -r requirements-ray.txt)")
serve = pytest.importorskip("ray.serve", reason="ray[serve] is not installed (pip install -r requirements-ray.txt)")

from segmentation.serving.headers import REPLICA_HEADER  # noqa: E402
from segmentation.serving.ray_app import build, runtime_env  # noqa: E402

pytestmark = pytest.mark.slow

SEGMENT = "/v1/images/segmentations"
CLICKS = 20
PICTURES = [png_b64(make_picture(200, 120, seed=100 + i)) for i in range(4)]


@pytest.fixture(scope="module")
def ray_url(hf_home):
    settings = {
        "SAMHQ_MODEL": HQ_ID,
        "SAMHQ_MODELS": f"{HQ_ID},{SAM_ID}",
        "SAMHQ_DEVICE": "cpu",
        "SAMHQ_PRELOAD_EXAMPLES": "0",
        "SAMHQ_CACHE_MB": "256",
    }
    try:
        ray.init(
            num_cpus=2,
            include_dashboard=False,
            _node_ip_address="127.0.0.1",
            runtime_env=runtime_env({**settings, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"}),
            log_to_driver=False,
        )
    except Exception as error:  # no shared memory, no sockets, ...: say why and skip
        pytest.skip(f"Ray cannot start here: {error}")
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build({"replicas": 2, "cpus": 1, "retries": 5, "batch": True}), name="samhq", route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def click(client: httpx.Client, picture: int, k: int, n: int = 1) -> httpx.Response:
    """The k-th click on a picture: one object, its points moving like a person's."""
    points = [[[20 + (7 * k) % 160, 15 + (11 * k) % 90]]]
    body = {"model": HQ_ID, "image_prompt": PICTURES[picture], "segment_prompt": points, "n": n}
    return client.post(SEGMENT, json=body)


def tokens(response: httpx.Response) -> tuple[int, int]:
    details = response.json()["usage"]["input_tokens_details"]
    return details["cached_tokens"], details["image_tokens"]


def assert_same_answer(ours: dict, theirs: dict) -> None:
    """Equal but for `created` and the scores' last float32 bits (a replica runs torch on 1 thread, the
    local server on 2: sums are added in another order). The masks are byte-identical PNGs."""
    assert ours.keys() == theirs.keys() and ours["usage"] == theirs["usage"]
    assert len(ours["data"]) == len(theirs["data"])
    for a, b in zip(ours["data"], theirs["data"]):
        assert a["b64_json"] == b["b64_json"]
        assert a["score"] == pytest.approx(b["score"], rel=1e-5)
        assert [s["area"] for s in a["segments"]] == [s["area"] for s in b["segments"]]
        assert [s["bbox"] for s in a["segments"]] == [s["bbox"] for s in b["segments"]]
        assert [s["score"] for s in a["segments"]] == pytest.approx([s["score"] for s in b["segments"]], rel=1e-5)


def test_same_answers_as_one_process(ray_url):
    """Responses, errors and the API's schema are those of the single-process server."""
    app, _ = build_api()
    requests = [
        {"model": HQ_ID, "image_prompt": png_b64(), "segment_prompt": [[[40, 30]], [[120, 60], [130, 70]]], "n": 2},
        {"model": HQ_ID, "image_prompt": png_b64(), "segment_prompt": [[[40, 30]]], "size": "80x50"},
        {"model": HQ_ID, "image_prompt": png_b64(), "segment_prompt": [[[4000, 30]]]},  # point outside: 400
        {"model": SAM_ID, "image_prompt": png_b64(), "segment_prompt": [[[40, 30], [50, 35]]]},
        {"model": "nope/nothing", "image_prompt": png_b64(), "segment_prompt": [[[4, 3]]]},  # 404
        {"model": HQ_ID, "image_prompt": "not base64!", "segment_prompt": [[[4, 3]]]},  # 400
        {"model": HQ_ID, "image_prompt": png_b64()},  # 422
    ]
    with LiveServer(app) as local, httpx.Client(timeout=120) as client:
        for body in requests:
            ours, theirs = client.post(ray_url + SEGMENT, json=body), client.post(local.url + SEGMENT, json=body)
            assert ours.status_code == theirs.status_code, ours.text
            if ours.status_code == 200:
                assert_same_answer(ours.json(), theirs.json())
                assert REPLICA_HEADER in ours.headers
            else:
                assert ours.content == theirs.content
        paths = client.get(ray_url + "/openapi.json").json()["paths"]
        assert paths == client.get(local.url + "/openapi.json").json()["paths"]


def test_vendor_sdk_through_rays_http_proxy(ray_url, sdk_python):
    result = subprocess.run(
        [sdk_python, "-c", SCRIPT, ray_url, "any-key", png_b64(make_picture(160, 100)), HQ_ID],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    payload = json.loads(result.stdout.strip().splitlines()[-1])
    assert len(payload["sync"]["data"]) == 2
    assert payload["sync"]["usage"]["input_tokens_details"]["point_tokens"] == 3


def test_every_click_after_the_first_finds_its_picture_cached(ray_url):
    """20 clicks on each of 4 pictures, taken in turns as 4 people would: only first clicks encode, every
    picture stays on one replica, and the pictures use both replicas."""
    replica_of: dict[int, set[str]] = {i: set() for i in range(len(PICTURES))}
    with httpx.Client(base_url=ray_url, timeout=120) as client:
        for k in range(CLICKS):
            for picture in range(len(PICTURES)):
                response = click(client, picture, k)
                assert response.status_code == 200, response.text
                cached, image = tokens(response)
                assert cached == (0 if k == 0 else image), f"picture {picture}, click {k + 1}: cached {cached}"
                replica_of[picture].add(response.headers[REPLICA_HEADER])
    assert all(len(replicas) == 1 for replicas in replica_of.values()), replica_of
    assert len(set.union(*replica_of.values())) == 2, f"all pictures on one replica: {replica_of}"


def test_killing_a_replica_mid_run_loses_no_request(ray_url):
    """4 clients keep clicking; one replica is killed after the first answers. Every request is answered 200
    (retried on the other replica, which encodes the pictures it did not hold)."""
    total, kill_after = 48, 8
    answered = threading.Condition()
    done: list[httpx.Response] = []
    kill_index: list[int] = []

    def client_loop(worker: int) -> list[httpx.Response]:
        results = []
        with httpx.Client(base_url=ray_url, timeout=120) as client:
            for k in range(total // 4):
                response = click(client, (worker + k) % len(PICTURES), 100 + k)
                results.append(response)
                with answered:
                    done.append(response)
                    answered.notify_all()
        return results

    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(client_loop, worker) for worker in range(4)]
        with answered:
            assert answered.wait_for(lambda: len(done) >= kill_after, timeout=300)
            victim = done[-1].headers[REPLICA_HEADER]
        actors = [a for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].endswith("#" + victim)]
        assert actors, f"no actor for replica {victim}"
        ray.kill(ray.get_actor(actors[0]["name"], namespace=actors[0]["namespace"]), no_restart=True)
        with answered:
            kill_index.append(len(done))
        responses = [response for future in futures for response in future.result()]

    assert len(responses) == total
    assert [r.status_code for r in responses] == [200] * total, [r.text for r in responses if r.status_code != 200]
    after_kill = done[kill_index[0] :]
    assert len(after_kill) >= total - kill_after - 4, "the kill came too late to test anything"
    assert after_kill[-1].headers[REPLICA_HEADER] != victim
    # the pictures the dead replica held were encoded again elsewhere
    assert any(tokens(r)[0] == 0 for r in after_kill)
