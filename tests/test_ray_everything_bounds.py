"""The bounds of "segment everything" on Ray Serve that a live cluster cannot show cheaply: the API (here the Ray
ingress's) takes at most `Settings.everything_runs` runs at once (429 past it, the rest of the API still
answering), and a replica runs one everything batch at a time whatever the runs. The real `Ingress.everything` / `_ask` / `_answer`
and the replica's `_one_batch` run here; only the deployment handle is a stand-in (a run that lasts until the
test lets it end). tests/test_ray_serve.py covers the same paths on a real cluster."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
from api_fixtures import png_b64
from conftest import HQ_ID
from fastapi import FastAPI
from live_server import LiveServer, wait_for

from segmentation import service
from segmentation.api import install_api
from segmentation.serving import ray_app
from segmentation.settings import Settings

ROUTE = "/v1/images/segmentations"


class _EndlessRun:
    """A Ray call that answers only once `release` is set (then as a cancelled run: a quiet 499)."""

    def __init__(self, release: threading.Event):
        self.release = release

    def result(self, timeout_s=None):
        if self.release.wait(timeout_s):
            raise ray_app.Cancelled()
        raise TimeoutError()

    def cancel(self):
        pass


class _Handle:
    """A deployment handle whose `everything` calls never finish until released; counts the calls sent."""

    def __init__(self):
        self.release, self.lock, self.calls = threading.Event(), threading.Lock(), 0
        self.everything = self

    def options(self, **_):
        return self

    def remote(self, request):
        with self.lock:
            self.calls += 1
        return _EndlessRun(self.release)


def test_runs_past_the_ingress_bound_are_429_and_the_api_still_answers():
    bound = 3
    settings = Settings(model=HQ_ID, models=(HQ_ID,), preload_examples=False, device="cpu", everything_runs=bound)
    ingress = object.__new__(ray_app.Ingress.func_or_class)  # the deployment's class, without Ray
    ingress.segmenter, ingress.retries, ingress.settings = _Handle(), 0, settings
    ingress.registry = service.ModelRegistry(settings)
    app = FastAPI()
    install_api(app, ingress.registry, settings, segment=ingress.segment, everything=ingress.everything)
    body = {"model": HQ_ID, "image_prompt": png_b64(), "segment_everything": {"points_per_side": 2}}
    n = 48  # past anyio's 40 worker threads: unbounded, the runs held every one of them
    with LiveServer(app) as server, ThreadPoolExecutor(n) as pool:
        try:
            futures = [pool.submit(httpx.post, server.url + ROUTE, json=body, timeout=60) for _ in range(n)]
            # the refused ones answer at once
            wait_for(lambda: sum(f.done() for f in futures) >= n - bound, 60, "the refused runs did not answer")
            refused = [f.result() for f in futures if f.done()]
            assert [r.status_code for r in refused] == [429] * (n - bound)
            assert refused[0].json()["error"]["type"] == "rate_limit_error"
            assert ingress.segmenter.calls == bound
            assert httpx.get(server.url + "/v1/models", timeout=10).status_code == 200  # other requests answer
        finally:
            ingress.segmenter.release.set()


class _ImpatientGate(service.AdmissionGate):
    """The replica's gate with its wait for others cut from 5 s to 20 ms, so that the batches below (50 ms)
    outlast it, as a ViT-B 16×16 run's batches (~5 s each) outlast the real one."""

    def admit_after_others(self, abandoned=None, max_wait: float = 0.02):
        return super().admit_after_others(abandoned, max_wait)


def test_a_replica_runs_one_everything_batch_at_a_time():
    replica = object.__new__(ray_app.SegmenterReplica.func_or_class)  # the deployment's class, without Ray
    replica._gate = _ImpatientGate(max_concurrent=ray_app.REPLICA_SLOTS, max_waiting=ray_app.REPLICA_SLOTS)
    replica._batch = threading.Lock()
    lock, inside, peak = threading.Lock(), [0], [0]
    start = threading.Barrier(6)

    def run() -> None:  # as SegmenterReplica._run_everything's batches
        start.wait()
        for _ in range(3):
            with replica._one_batch():
                with lock:
                    inside[0] += 1
                    peak[0] = max(peak[0], inside[0])
                time.sleep(0.05)  # a batch's work
                with lock:
                    inside[0] -= 1

    threads = [threading.Thread(target=run) for _ in range(6)]  # six runs on one replica
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert peak[0] == 1
