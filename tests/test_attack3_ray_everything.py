"""attack3: segment everything on the Ray ingress has no backpressure, and a replica's gate lets every run's
batch in at once. Both tests FAIL on main (they state what the docs promise); no Ray cluster needed: the real
`Ingress.everything`/`_ask`/`_answer` run against a fake deployment handle, the real replica gate in threads."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
from api_fixtures import png_b64
from conftest import HQ_ID
from fastapi import FastAPI
from live_server import LiveServer

from segmentation import service
from segmentation.api import install_api
from segmentation.serving import ray_app
from segmentation.settings import Settings

ROUTE = "/v1/images/segmentations"


class _Response:
    """A Ray call that never finishes until `release` is set (a long everything run on a busy replica)."""

    def __init__(self, release: threading.Event):
        self.release, self.cancelled = release, False

    def result(self, timeout_s=None):
        if self.release.wait(timeout_s):
            raise ray_app.Cancelled()  # answered 499, quietly
        raise TimeoutError()

    def cancel(self):
        self.cancelled = True


class _Method:
    def __init__(self, handle):
        self.handle = handle

    def remote(self, request):
        with self.handle.lock:
            self.handle.calls += 1
        return _Response(self.handle.release)


class _Handle:
    def __init__(self):
        self.release, self.lock, self.calls = threading.Event(), threading.Lock(), 0
        self.everything = _Method(self)

    def options(self, **_):
        return self


def test_ray_ingress_everything_is_bounded_like_the_plain_app():
    settings = Settings(model=HQ_ID, models=(HQ_ID,), preload_examples=False, device="cpu", max_queue=4)
    ingress = object.__new__(ray_app.Ingress.func_or_class)
    ingress.segmenter, ingress.retries, ingress.settings = _Handle(), 0, settings
    ingress.registry = service.ModelRegistry(settings)
    if hasattr(ray_app, "EVERYTHING_RUNS"):  # the proposed fix's bound (Ingress.__init__ is not run here)
        ingress._everything_runs = threading.BoundedSemaphore(ray_app.EVERYTHING_RUNS)
    app = FastAPI()
    install_api(app, ingress.registry, settings, segment=ingress.segment, everything=ingress.everything)
    body = {"model": HQ_ID, "image_prompt": png_b64(), "segment_everything": {"points_per_side": 2}}
    n = 48  # past anyio's 40 worker threads; the plain app answers all but 4 running + 4 waiting with 429
    with LiveServer(app) as server, ThreadPoolExecutor(n) as pool:
        try:
            futures = [pool.submit(httpx.post, server.url + ROUTE, json=body, timeout=60) for _ in range(n)]
            time.sleep(4)
            statuses = [f.result().status_code for f in futures if f.done()]
            in_flight = ingress.segmenter.calls
            # any other request now: the ingress's worker threads are all held by polling everything calls
            start = time.perf_counter()
            try:
                httpx.get(server.url + "/v1/models", timeout=5)
                models_s = time.perf_counter() - start
            except httpx.TimeoutException:
                models_s = float("inf")
        finally:
            ingress.segmenter.release.set()
    print(f"429s: {statuses.count(429)}, Ray calls in flight: {in_flight}, /v1/models took {models_s:.1f} s")
    assert statuses.count(429) > 0, "no backpressure: every everything request was sent to the replicas"
    assert models_s < 2, "the ingress stopped answering other requests"


def test_replica_gate_runs_one_everything_batch_at_a_time():
    replica = object.__new__(ray_app.SegmenterReplica.func_or_class)
    replica._gate = service.AdmissionGate(max_concurrent=ray_app.REPLICA_SLOTS, max_waiting=ray_app.REPLICA_SLOTS)
    replica._batch = threading.Lock()
    batch_context = getattr(replica, "_one_batch", replica._gate.admit_after_others)  # main: the gate alone
    lock, inside, peak = threading.Lock(), [0], [0]

    def run():  # as SegmenterReplica._run_everything: batch_context=self._gate.admit_after_others
        for _ in range(3):
            with batch_context():
                with lock:
                    inside[0] += 1
                    peak[0] = max(peak[0], inside[0])
                time.sleep(1.5)  # one batch (a 16x16 run on CPU is ~5 s a batch, docs/PERFORMANCE.md)
                with lock:
                    inside[0] -= 1

    threads = [threading.Thread(target=run) for _ in range(6)]  # 6 runs; Ray lets 16 in a replica
    [t.start() for t in threads]
    [t.join() for t in threads]
    print("everything batches running at once on one replica:", peak[0])
    assert peak[0] == 1, "a click on this replica waits for every batch running, not 'at most one batch'"
