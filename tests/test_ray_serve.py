"""The API on Ray Serve, from the outside: `python -m segmentation.serving.ray_app` as an operator starts it (its
own local cluster, loopback, 2 CPUs, 2 Segmenter replicas of the tiny checkpoint), driven over raw HTTP through
Ray's proxy and with the vendor SDK, inspected with Ray's own `serve status` and `ray list actors`, a replica
killed by its pid, and stopped with Ctrl-C. "Segment everything" on the same cluster: the single-process answer and
errors, clicks first between batches, a client that leaves stops the run, a run whose replica dies is run again.

Skipped with the reason where ray[serve] is not installed (requirements-ray.txt).
"""

from __future__ import annotations

import base64
import json
import math
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
from api_fixtures import build_api, png_b64
from conftest import HQ_ID, SAM_ID, make_picture
from live_server import LiveServer, free_port, wait_for
from test_sdk import SCRIPT

ray = pytest.importorskip("ray", reason="ray[serve] is not installed (pip install -r requirements-ray.txt)")
serve = pytest.importorskip("ray.serve", reason="ray[serve] is not installed (pip install -r requirements-ray.txt)")

from segmentation.client import SegmentationClient  # noqa: E402
from segmentation.serving.headers import REPLICA_HEADER  # noqa: E402
from segmentation.serving.ray_app import picture_id  # noqa: E402
from segmentation.settings import Settings  # noqa: E402
from ui.remote import RemoteBackend  # noqa: E402
from ui.state import Picture  # noqa: E402

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the `ray` and `serve` commands of this environment
SEGMENT = "/v1/images/segmentations"
CLICKS = 20
PICTURES = [png_b64(make_picture(200, 120, seed=100 + i)) for i in range(4)]
READY = "Ctrl-C stops it"


@dataclass
class Cluster:
    url: str
    process: subprocess.Popen
    log: Path
    env: dict
    home: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def dashboard(self) -> str:
        found = re.search(r"dashboard and state API: (\S+)", self.output())
        assert found, self.output()[-3000:]
        return found.group(1)

    def command(self, *args: str) -> str:
        """An operator's command (`ray ...`, `serve ...`) against this cluster, with its HOME (Ray's token) and
        the variables the command printed to put before them."""
        name = Path(args[0]).name
        printed = re.search(rf"^.*INFO __main__:\s+(.*?){name} (list|status)", self.output(), re.MULTILINE)
        assert printed, self.output()[-3000:]
        prefix = dict(item.split("=", 1) for item in shlex.split(printed.group(1)))  # e.g. RAY_AUTH_MODE=token
        done = subprocess.run(args, env={**self.env, **prefix}, capture_output=True, text=True, timeout=180)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        return done.stdout


@pytest.fixture(scope="module")
def cluster(hf_home, tmp_path_factory):
    home = tmp_path_factory.mktemp("ray-home")  # Ray's token file goes to $HOME/.ray: a temporary one here
    port = free_port()
    env = {
        **os.environ,
        "HOME": str(home),
        "RAY_ADDRESS": "127.0.0.1:1",  # nothing there: the command must start its own cluster regardless
        "SAMHQ_MODEL": HQ_ID,
        "SAMHQ_MODELS": f"{HQ_ID},{SAM_ID}",
        "SAMHQ_DEVICE": "cpu",
        "SAMHQ_PRELOAD_EXAMPLES": "0",
        "SAMHQ_CACHE_MB": "256",
        "SAMHQ_RAY_RETRIES": "5",
        "HF_HOME": str(hf_home),
        "HF_HUB_OFFLINE": "1",
    }
    log = home / "ray_app.log"
    command = [sys.executable, "-m", "segmentation.serving.ray_app", "--port", str(port), "--replicas", "2"]
    with log.open("w") as out:
        process = subprocess.Popen(
            [*command, "--cpus", "1", "--batch"],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, as a terminal's foreground job
        )
    running = Cluster(f"http://127.0.0.1:{port}", process, log, env, home)
    try:
        deadline = time.monotonic() + 400
        while READY not in running.output():
            assert process.poll() is None, f"ray_app exited with {process.returncode}:\n{running.output()[-4000:]}"
            assert time.monotonic() < deadline, f"ray_app not ready:\n{running.output()[-4000:]}"
            time.sleep(0.5)
        yield running
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGINT)
            try:
                process.wait(timeout=120)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


@pytest.fixture(scope="module")
def ray_url(cluster):
    return cluster.url


def click(client: httpx.Client, picture: int | str, k: int, n: int = 1) -> httpx.Response:
    """The k-th click on a picture (an index into PICTURES, or base64): one object, its point moving like a person's."""
    points = [[[20 + (7 * k) % 160, 15 + (11 * k) % 90]]]
    image = PICTURES[picture] if isinstance(picture, int) else picture
    body = {"model": HQ_ID, "image_prompt": image, "segment_prompt": points, "n": n}
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


def test_new_pictures_arriving_together_spread_over_the_replicas(ray_url):
    """4 first clicks on 4 new pictures sent at the same instant (before any replica can report what it holds)
    are encoded on both replicas, at most ceil(4 / 2) + 1 on one; then 5 more clicks on each, 4 clients at
    once, find their picture cached (>= 95 %) on the replica of its first click."""
    n, later = 4, 5
    pictures = [png_b64(make_picture(200, 120, seed=300 + i)) for i in range(n)]
    together = threading.Barrier(n)

    def first_click(i: int) -> httpx.Response:
        with httpx.Client(base_url=ray_url, timeout=300) as client:
            together.wait(timeout=60)
            return click(client, pictures[i], 0)

    with ThreadPoolExecutor(n) as pool:
        firsts = list(pool.map(first_click, range(n)))  # returns once every request is answered
    assert [r.status_code for r in firsts] == [200] * n, [r.text for r in firsts]
    assert all(tokens(r)[0] == 0 for r in firsts), "each first click encodes its picture"
    home = [r.headers[REPLICA_HEADER] for r in firsts]
    per_replica = Counter(home)
    assert len(per_replica) == 2 and max(per_replica.values()) <= math.ceil(n / 2) + 1, per_replica

    def later_clicks(i: int) -> list[httpx.Response]:
        with httpx.Client(base_url=ray_url, timeout=300) as client:
            return [click(client, pictures[i], k) for k in range(1, later + 1)]

    with ThreadPoolExecutor(n) as pool:
        answers = list(pool.map(later_clicks, range(n)))
    hits = sum(
        r.status_code == 200 and tokens(r)[0] == tokens(r)[1] and r.headers[REPLICA_HEADER] == home[i]
        for i, responses in enumerate(answers)
        for r in responses
    )
    assert hits >= 0.95 * n * later, f"{hits} of {n * later} later clicks found their picture"


def test_an_operator_maps_the_replica_header_to_a_process(cluster):
    """What the command says it wrote exists; `serve status` and Ray's state API (`ray list actors`) work
    against it; every x-samhq-replica value is a live replica process; /v1/models tells the replicas' truth."""
    output = cluster.output()
    logs = re.search(r"logs in (\S+)", output)
    assert logs and Path(logs.group(1)).is_dir(), output[-3000:]
    token = cluster.home / ".ray" / "auth_token"
    assert (f"token is in {token}" in output) == token.exists(), "the token file is named when Ray wrote one"
    assert "local, started here" in output
    dashboard = cluster.dashboard()
    status = cluster.command(str(BIN / "serve"), "status", "--address", dashboard)
    assert "samhq" in status and "RUNNING" in status and "Segmenter" in status, status
    pids = replica_pids(cluster)
    assert len(pids) == 2, pids
    for name, pid in pids.items():
        assert f"replica {name}: pid {pid}" in output, "the command printed the same map at start"
        os.kill(pid, 0)  # a live process of this machine
    with httpx.Client(base_url=cluster.url, timeout=120) as client:
        seen = {click(client, picture, 50).headers[REPLICA_HEADER] for picture in range(len(PICTURES))}
        assert seen <= set(pids), (seen, pids)
        models = client.get("/v1/models").json()["data"]
    assert {m["id"]: m["status"] for m in models} == {HQ_ID: "loaded", SAM_ID: "loaded"}


# ---- segment everything on the replicas (before the kill: they run on the replicas of the first pictures) ----

EVERYTHING = {  # random weights: lowered thresholds, so some masks are found; every box is about the whole picture
    "points_per_side": 6,
    "points_per_batch": 12,
    "pred_iou_thresh": 0.0,
    "stability_score_thresh": 0.05,
    "box_nms_thresh": 1.0,
}
LONG_RUN = {**EVERYTHING, "points_per_side": 16, "points_per_batch": 16}  # 16 batches, seconds each on a loaded CPU
STATS = """
import json, sys
import ray
from ray import serve
ray.init(address=sys.argv[1], log_to_driver=False, logging_level="ERROR")
handle = serve.get_deployment_handle("Segmenter", app_name="samhq")
print("ready", flush=True)
for line in sys.stdin:
    answer = handle.options(multiplexed_model_id=line.strip()).stats.remote().result(timeout_s=60)
    print(json.dumps(answer), flush=True)
"""


@pytest.fixture(scope="module")
def one_process():
    """The single-process server the Ray answers are compared with."""
    app, _ = build_api()
    with LiveServer(app) as local:
        yield local.url


class ReplicaStats:
    """A replica's `stats()` as an operator gets them: a Ray driver on the cluster calls the Segmenter deployment
    with a picture's id, which Ray routes to the replica holding that picture."""

    def __init__(self, cluster: Cluster):
        gcs = re.search(r"Ray cluster: (\S+) ", cluster.output())
        assert gcs, cluster.output()[-3000:]
        printed = re.search(r"^.*INFO __main__:\s+(.*?)ray list", cluster.output(), re.MULTILINE)
        prefix = dict(item.split("=", 1) for item in shlex.split(printed.group(1))) if printed else {}
        prefix.pop("RAY_API_SERVER_ADDRESS", None)
        self.process = subprocess.Popen(
            [sys.executable, "-c", STATS, gcs.group(1)],
            cwd=ROOT,  # the router's class is imported from the project
            env={**cluster.env, **prefix},
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.process.stdout.readline().strip() == "ready"

    def __call__(self, picture: str) -> dict:
        self.process.stdin.write(picture + "\n")
        self.process.stdin.flush()
        return json.loads(self.process.stdout.readline())

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=60)


@pytest.fixture
def replica_stats(cluster):
    stats = ReplicaStats(cluster)
    try:
        yield stats
    finally:
        stats.close()


def everything_body(image: str, knobs: dict, **more) -> dict:
    return {"model": HQ_ID, "image_prompt": image, "segment_everything": knobs, **more}


def test_segment_everything_answers_as_one_process(ray_url, one_process, tmp_path):
    """The label map (byte-identical PNG), the segments and the usage of the single-process server; its
    picture's embedding reused (a click before it encoded it) on the replica of that click."""
    image = png_b64(make_picture(160, 100, seed=5))
    with httpx.Client(timeout=300) as client:
        prompt = {"model": HQ_ID, "image_prompt": image, "segment_prompt": [[[9, 9]]]}
        first = client.post(ray_url + SEGMENT, json=prompt)
        assert first.status_code == client.post(one_process + SEGMENT, json=prompt).status_code == 200, first.text
        answers = []
        for body in (everything_body(image, EVERYTHING), everything_body(image, EVERYTHING, size="80x50")):
            ours, theirs = client.post(ray_url + SEGMENT, json=body), client.post(one_process + SEGMENT, json=body)
            assert ours.status_code == theirs.status_code == 200, ours.text
            assert len(ours.json()["data"][0]["segments"]) >= 2, "the comparison needs a few objects"
            assert_same_answer(ours.json(), theirs.json())
            assert [s["point"] for s in ours.json()["data"][0]["segments"]] == [
                s["point"] for s in theirs.json()["data"][0]["segments"]
            ]
            assert ours.headers[REPLICA_HEADER] == first.headers[REPLICA_HEADER]
            cached, image_tokens = tokens(ours)
            assert cached == image_tokens, "no second encode"
            answers.append(ours.json())
    expected = answers[0]["data"][0]  # at the picture's size
    with SegmentationClient(ray_url) as ours_client:  # our client
        answer = ours_client.images.segment_everything(image=base64.b64decode(image), model=HQ_ID, **EVERYTHING)
    assert answer.data[0].b64_json == expected["b64_json"]
    assert [s.point for s in answer.data[0].segments] == [s["point"] for s in expected["segments"]]
    # the page in front of this application (`app.py --backend`): the grid points of the objects, best first
    source = tmp_path / "picture.png"
    source.write_bytes(base64.b64decode(image))
    remote = RemoteBackend(ray_url, Settings(model=HQ_ID, preload_examples=False))
    found = remote.everything(
        HQ_ID, Picture("p", 160, 100, (160, 100), str(source)), EVERYTHING, hq_only=False, grid_points=36
    )
    assert found == [list(s["point"]) for s in expected["segments"]]


def test_segment_everything_refuses_bad_knobs_as_one_process(ray_url, one_process):
    huge = png_b64(np.zeros((1500, 2000, 3), dtype=np.uint8))  # 3 megapixels × 64² points: past the work limit
    small = png_b64(make_picture(40, 30))
    bodies = [
        everything_body(small, {"points_per_side": 100}),
        everything_body(small, {"box_nms_thresh": 2}),
        everything_body(small, {"pred_iou": 0.5}),
        everything_body(small, "all"),
        everything_body(small, True, segment_prompt=[[[10, 10]]]),
        everything_body(small, True, n=3),
        everything_body(small, True, size="0x5"),
        everything_body(huge, {"points_per_side": 64}),
    ]
    with httpx.Client(timeout=120) as client:
        for body in bodies:
            ours, theirs = client.post(ray_url + SEGMENT, json=body), client.post(one_process + SEGMENT, json=body)
            assert 400 <= ours.status_code < 500 and ours.status_code == theirs.status_code, ours.text
            assert ours.content == theirs.content
            assert ours.json()["error"]["param"] and ours.json()["error"]["code"] != "not_supported"


SDK_EVERYTHING = """
import json, sys
from air import AIRefinery
base_url, image, model, knobs = sys.argv[1:5]
response = AIRefinery(api_key="k", base_url=base_url).images.segment(
    image=image, segment_prompt=[], model=model, extra_body={"segment_everything": json.loads(knobs)}
)
print(json.dumps(response.model_dump()))
"""


def test_segment_everything_with_the_vendor_sdk(ray_url, one_process, sdk_python):
    """Through `extra_body`, as in one process: the same label map (the SDK's model keeps only the map)."""
    image = png_b64(make_picture(160, 100, seed=6))
    result = subprocess.run(
        [sdk_python, "-c", SDK_EVERYTHING, ray_url, image, HQ_ID, json.dumps(EVERYTHING)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    payload = json.loads(result.stdout.strip().splitlines()[-1])
    expected = httpx.post(one_process + SEGMENT, json=everything_body(image, EVERYTHING), timeout=300).json()
    assert payload["data"][0]["b64_json"] == expected["data"][0]["b64_json"]


def test_a_click_during_a_run_is_answered_after_at_most_one_batch(ray_url, replica_stats):
    """Clicks on the picture of a running everything go to its replica, are answered before the run ends, and
    wait for at most the batch running when they came (the replica's own count)."""
    image = png_b64(make_picture(200, 120, seed=7))
    picture = picture_id(HQ_ID, base64.b64decode(image))
    with httpx.Client(base_url=ray_url, timeout=300) as client, ThreadPoolExecutor(1) as pool:
        home = click(client, image, 0).headers[REPLICA_HEADER]
        before = replica_stats(picture)
        assert before["replica"] == home
        run = pool.submit(client.post, SEGMENT, json=everything_body(image, LONG_RUN))
        wait_for(
            lambda: replica_stats(picture)["everything"]["batches"] > before["everything"]["batches"],
            120,
            "the run did not start",
        )
        answered = 0
        for k in range(1, 4):
            response = click(client, image, k)
            if run.done():
                break
            assert response.status_code == 200 and response.headers[REPLICA_HEADER] == home, response.text
            answered += 1
        assert answered >= 1, "the run ended before a click was answered"
        everything = run.result()
    assert everything.status_code == 200 and everything.headers[REPLICA_HEADER] == home, everything.text
    after = replica_stats(picture)["everything"]
    assert after["finished"] == before["everything"]["finished"] + 1
    assert after["batches"] - before["everything"]["batches"] == 16
    assert after["most_batches_during_a_click"] <= 1, after


def test_a_client_that_leaves_stops_the_run(ray_url, replica_stats):
    """The client of an everything run hangs up mid-run: the replica stops it before its last batch."""
    image = png_b64(make_picture(200, 120, seed=8))
    picture = picture_id(HQ_ID, base64.b64decode(image))
    with httpx.Client(base_url=ray_url, timeout=300) as client:
        assert click(client, image, 0).status_code == 200
    before = replica_stats(picture)["everything"]
    payload = json.dumps(everything_body(image, LONG_RUN)).encode()
    host, port = ray_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=60) as raw:
        raw.sendall(
            f"POST {SEGMENT} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(payload)}\r\n\r\n".encode()
            + payload
        )
        wait_for(
            lambda: replica_stats(picture)["everything"]["batches"] > before["batches"], 120, "the run did not start"
        )
    after = wait_for(
        lambda: (now := replica_stats(picture)["everything"])["cancelled"] > before["cancelled"] and now,
        120,
        "the run was not stopped",
    )
    assert after["finished"] == before["finished"]
    assert after["batches"] - before["batches"] < 16, after
    assert replica_stats(picture)["everything"]["batches"] == after["batches"]


def test_killing_a_replica_mid_run_loses_no_request(cluster):
    """4 clients keep clicking; one replica's process is killed (SIGKILL, found by its header through Ray's
    state API) after the first answers. Every request is answered 200 (retried on the other replica, which
    encodes the pictures it did not hold)."""
    ray_url = cluster.url
    pids = replica_pids(cluster)  # looked up before: the kill comes at once
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
        os.kill(pids[victim], signal.SIGKILL)
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


def test_an_everything_run_whose_replica_dies_is_run_again_on_another(cluster, replica_stats):
    """The replica running an everything run is killed mid-run: the ingress runs it again on the other replica
    (which encodes the picture), and the client gets its answer."""
    image = png_b64(make_picture(200, 120, seed=9))
    picture = picture_id(HQ_ID, base64.b64decode(image))
    pids = wait_for(lambda: len(found := replica_pids(cluster)) == 2 and found, 180, "a replica did not come back")
    with httpx.Client(base_url=cluster.url, timeout=300) as client, ThreadPoolExecutor(1) as pool:
        home = click(client, image, 0).headers[REPLICA_HEADER]
        before = replica_stats(picture)["everything"]["batches"]
        run = pool.submit(client.post, SEGMENT, json=everything_body(image, LONG_RUN))
        wait_for(lambda: replica_stats(picture)["everything"]["batches"] > before, 120, "the run did not start")
        os.kill(pids[home], signal.SIGKILL)
        answer = run.result()
        assert answer.status_code == 200, answer.text
        assert answer.headers[REPLICA_HEADER] != home
    assert tokens(answer)[0] == 0, "encoded again on the other replica"
    assert answer.json()["usage"]["input_tokens_details"]["point_tokens"] == LONG_RUN["points_per_side"] ** 2


def replica_pids(cluster: Cluster) -> dict[str, int]:
    """Each live Segmenter replica's process, by the name its x-samhq-replica header carries, as an operator
    finds it: Ray's state API (`ray list actors`)."""
    listed = cluster.command(
        str(BIN / "ray"),
        "list",
        "actors",
        "--filter",
        "state=ALIVE",
        "--format",
        "json",
    )
    prefix = "SERVE_REPLICA::samhq#Segmenter#"
    return {
        actor["name"][len(prefix) :]: actor["pid"]
        for actor in json.loads(listed)
        if (actor.get("name") or "").startswith(prefix)
    }


def test_ctrl_c_stops_everything_without_a_traceback(cluster):
    """Ctrl-C in a terminal (SIGINT to the foreground process group): the command stops the application and its
    local cluster, exits 0, prints no traceback, and the API port is closed. (Last: it ends the module's cluster.)"""
    before = len(cluster.output())
    os.killpg(cluster.process.pid, signal.SIGINT)
    assert cluster.process.wait(timeout=180) == 0, cluster.output()[-4000:]
    output = cluster.output()
    assert "Traceback" not in output[before:], output[before:][-4000:]
    assert output.rstrip().endswith("stopped"), output[-2000:]
    with pytest.raises(httpx.ConnectError):
        httpx.get(cluster.url + "/v1/models", timeout=10)
