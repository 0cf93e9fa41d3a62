"""The HTTP API on Ray Serve: one ingress deployment with our own routes, N Segmenter replicas behind it.

    python -m segmentation.serving.ray_app --replicas 2          # a new local cluster, API on 127.0.0.1:8000
    python -m segmentation.serving.ray_app --address HOST:6379   # the application on a running cluster
    serve run deploy/serve.yaml                                   # or `serve deploy` to a running cluster

* Same contract: the ingress is a FastAPI app built by `api.install_api` (routes, limits, errors,
  /openapi.json) whose segmentation call goes to a Segmenter replica through a deployment handle.
  /v1/models reports the models' status as a replica has it.
* Cache affinity: a picture's content digest is the request's multiplexed model id. A replica "loads" the
  id on its first click (the embedding goes into that replica's own byte-bounded cache, as in one process)
  and reports it to the controller; our request router (`router.PictureRouter`, Ray's pluggable router
  API) sends every later request with that id there, and places a new picture at once by rendezvous
  hashing with bounded load, so pictures arriving together spread over the replicas. A replica holds at
  most `max_pictures` ids (LRU, Ray's `max_num_models_per_replica`); keep that times the size of one
  embedding within the cache budget (SAMHQ_CACHE_MB).
* When a replica dies mid-request the ingress retries on another one, which encodes the picture again.
* "Segment everything" runs on the replica that holds the picture (the same picture id as a click: its cached
  embedding, no second encode). The replica yields between batches to its own clicks (its `AdmissionGate`:
  a click waits for at most one batch); when the HTTP client leaves, the ingress cancels the Ray call and the
  replica stops the run before its next batch.
* Decodes of concurrent clicks on one picture are merged into one decoder call (`batching`).
* The replica that answered is named in the `x-samhq-replica` response header (for tests and operators);
  `ray list actors` maps it to a process (the command prints how).

Ray is imported here only: nothing else in the project imports this module.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import hashlib
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

import ray
from fastapi import FastAPI
from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError, RayTaskError
from ray.serve.config import RequestRouterConfig
from ray.serve.handle import DeploymentHandle, DeploymentResponse

from .. import service
from ..api import install_api
from ..engine import Segmenter
from ..errors import ModelUnavailableError, SegmentationError
from ..everything import Cancelled, Progress
from ..models import fit_cpu_threads, resolve_device
from ..settings import Settings
from .batching import BatchingSegmenter
from .headers import ReplicaHeader, answered_by
from .router import PictureRouter

log = logging.getLogger(__name__)

TITLE, VERSION = "SAM-HQ point segmentation", "0.1.0"  # app.py's, so /openapi.json is the same document
FORWARDED_ENV = ("SAMHQ_", "HF_", "TRANSFORMERS_", "HUGGINGFACE_")  # what replicas need of the driver's environment
# A replica's gate only tells an everything run who else is in (Ray's max_ongoing_requests bounds the requests)
REPLICA_SLOTS = 1024
POLL_SECONDS = 0.2  # how often the ingress looks whether the client of an everything run is still there
# A run that lost its replica is tried once more, not `retries` times: a picture whose run kills a replica (memory)
# must not take the others down one by one
EVERYTHING_RETRIES = 1


def _env_number(name: str, default: float) -> float:
    raw = os.environ.get(name, "").strip()
    try:
        return float(raw) if raw else default
    except ValueError as error:
        raise ValueError(f"{name} must be a number, got {raw!r}") from error


def _env_auto_flag(name: str) -> bool | None:
    raw = os.environ.get(name, "").strip().lower()
    return None if raw in ("", "auto") else raw not in ("0", "false", "no", "off")


@dataclasses.dataclass(frozen=True)
class RayOptions:
    """The deployment's knobs (env var, default). In deploy/serve.yaml Ray's own `deployments:` section
    overrides replicas, CPUs/GPUs, max_ongoing_requests and sets autoscaling_config."""

    replicas: int = 2  # SAMHQ_RAY_REPLICAS: Segmenter replicas (each loads the model)
    cpus: float = 1.0  # SAMHQ_RAY_CPUS: CPUs per Segmenter replica (torch uses that many threads)
    gpus: float = 0.0  # SAMHQ_RAY_GPUS: GPUs per Segmenter replica (fractions share one GPU)
    max_pictures: int = 48  # SAMHQ_RAY_MAX_PICTURES: picture ids a replica holds for routing (LRU)
    max_ongoing: int = 16  # SAMHQ_RAY_MAX_ONGOING: requests a replica takes at once (merged decodes need > 1)
    ingress_replicas: int = 1  # SAMHQ_RAY_INGRESS_REPLICAS: API processes (no model; 4 segmentations each at once)
    retries: int = 3  # SAMHQ_RAY_RETRIES: tries on another replica when one dies mid-request
    batch: bool | None = None  # SAMHQ_RAY_BATCH: merge concurrent decodes on one picture: 1, 0, auto (= on a GPU)

    @classmethod
    def from_env(cls, **overrides: Any) -> RayOptions:
        values = {
            "replicas": int(_env_number("SAMHQ_RAY_REPLICAS", cls.replicas)),
            "cpus": _env_number("SAMHQ_RAY_CPUS", cls.cpus),
            "gpus": _env_number("SAMHQ_RAY_GPUS", cls.gpus),
            "max_pictures": int(_env_number("SAMHQ_RAY_MAX_PICTURES", cls.max_pictures)),
            "max_ongoing": int(_env_number("SAMHQ_RAY_MAX_ONGOING", cls.max_ongoing)),
            "ingress_replicas": int(_env_number("SAMHQ_RAY_INGRESS_REPLICAS", cls.ingress_replicas)),
            "retries": int(_env_number("SAMHQ_RAY_RETRIES", cls.retries)),
            "batch": _env_auto_flag("SAMHQ_RAY_BATCH"),
        }
        values.update({key: value for key, value in overrides.items() if value is not None})
        return cls(**values)


def picture_id(model: str, image: bytes) -> str:
    """The multiplexed model id of a (model, picture) pair: a digest of the picture's bytes as sent."""
    digest = hashlib.blake2b(model.encode() + b"\0", digest_size=16)
    digest.update(image)
    return digest.hexdigest()


# ---- deployments ------------------------------------------------------------------------------


class _Held:
    """What a replica 'loads' for a picture id: the id itself. The embedding lives in the replica's
    cache and is made by the request that needs it, so `cached_tokens` reports the truth."""

    def __init__(self, picture: str):
        self.picture = picture


@serve.deployment(name="Segmenter")
class SegmenterReplica:
    """One model and its own embedding cache (SAMHQ_* settings from the environment, as in one process)."""

    def __init__(self, max_pictures: int = RayOptions.max_pictures, batch: bool | None = RayOptions.batch):
        self.settings = dataclasses.replace(Settings.from_env(), preload_examples=False)
        fit_cpu_threads(self.settings.threads)  # Ray sets OMP_NUM_THREADS to the replica's CPUs
        if batch is None:  # auto: a GPU decodes N objects in about the time of one; a CPU takes N times as long
            batch = resolve_device(self.settings.device).type == "cuda"  # (docs/SCALING.md, measured on CPU)
        self.batching = batch
        loader = _load_batching if batch else Segmenter.from_pretrained
        self.registry = service.ModelRegistry(self.settings, loader=loader)
        # a thread per request Ray lets in (the default executor has cores + 4): concurrent clicks on one
        # picture must all reach the decode to be merged
        self._threads = ThreadPoolExecutor(max_workers=64, thread_name_prefix="segment")
        # who is working: a "segment everything" batch starts once no click is in (at most 5 s), so a click
        # arriving during a run waits for at most the batch that is running
        self._gate = service.AdmissionGate(max_concurrent=REPLICA_SLOTS, max_waiting=REPLICA_SLOTS)
        self._batch = threading.Lock()  # one everything batch at a time on this replica, whatever the runs
        self._counts_lock = threading.Lock()
        self._everything = {"runs": 0, "finished": 0, "cancelled": 0, "batches": 0, "most_batches_during_a_click": 0}
        self.name = serve.get_replica_context().replica_id.unique_id

        async def hold(picture: str) -> _Held:
            return _Held(picture)

        # configured at run time, as Ray's multiplexing allows: max_pictures is a setting
        self._hold = serve.multiplexed(max_num_models_per_replica=max_pictures)(hold)
        for name in self.registry.served:  # ready only once the models are loaded (a failure answers 503)
            try:
                self.registry.get(name)
            except ModelUnavailableError:
                log.exception("replica %s could not load %s", self.name, name)

    async def segment(self, request: dict[str, Any]) -> tuple[service.SegmentResult | SegmentationError, str]:
        """`service.segment(registry, **request)` on this replica; returns (result or our error, replica name)."""
        picture = serve.get_multiplexed_model_id()
        if picture:
            await self._hold(picture)
        work = partial(self._segment, request)
        try:
            result = await asyncio.get_running_loop().run_in_executor(self._threads, work)
        except SegmentationError as error:  # the caller's mistake, or a 503: an answer, not a replica failure
            return error, self.name  # (raised, Ray would log a traceback for every bad request)
        return result, self.name

    def _segment(self, request: dict[str, Any]) -> service.SegmentResult:
        with self._gate.admit():  # never waits: it tells a running everything that a click is in
            before = self._everything["batches"]
            try:
                return service.segment(self.registry, **request)
            finally:  # how many everything batches a click waited for, at most (1: the one running when it came)
                during = self._everything["batches"] - before
                with self._counts_lock:
                    self._everything["most_batches_during_a_click"] = max(
                        self._everything["most_batches_during_a_click"], during
                    )

    async def everything(self, request: dict[str, Any]) -> tuple[service.SegmentResult | SegmentationError, str]:
        """`service.segment_everything(registry, **request)` on this replica, batch by batch behind its clicks.
        Cancelled by the caller (Ray raises CancelledError here), the run stops before its next batch."""
        picture = serve.get_multiplexed_model_id()
        if picture:
            await self._hold(picture)
        stop = threading.Event()
        work = partial(self._run_everything, request, stop)
        try:
            result = await asyncio.get_running_loop().run_in_executor(self._threads, work)
        except asyncio.CancelledError:  # the ingress cancelled the call: its HTTP client left
            stop.set()  # the thread goes on until the generator reads this, before its next batch
            raise
        except SegmentationError as error:
            return error, self.name
        return result, self.name

    def _run_everything(self, request: dict[str, Any], stop: threading.Event) -> service.SegmentResult:
        def count(key: str, by: int = 1) -> None:
            with self._counts_lock:
                self._everything[key] += by

        def batch_done(_: Progress) -> None:
            count("batches")

        count("runs")
        try:
            result = service.segment_everything(
                self.registry,
                **request,
                batch_context=self._one_batch,
                progress=batch_done,
                cancelled=stop.is_set,
            )
        except Cancelled:
            count("cancelled")
            log.info("replica %s: an everything run stopped, its caller left", self.name)
            raise
        count("finished")
        return result

    @contextlib.contextmanager
    def _one_batch(self):
        """A batch's turn: after the clicks that are in (at most 5 s), and never beside another run's batch."""
        with self._gate.admit_after_others(), self._batch:
            yield

    def model_status(self) -> dict[str, str]:
        """Each served model's status on this replica: 'loaded', or why not (the ingress's /v1/models)."""
        return {name: self.registry.status(name) for name in self.registry.served}

    def stats(self) -> dict[str, Any]:
        """This replica's name, cache counters and batching counters (benchmarks, operators)."""
        models = self.registry.loaded()
        batchers = [m.batcher for m in models.values() if isinstance(m, BatchingSegmenter)]
        return {
            "replica": self.name,
            "pid": os.getpid(),
            "batching": self.batching,
            "cache": dataclasses.asdict(self.registry.cache.stats()),
            "decoder_calls": sum(b.calls for b in batchers),
            "decoded_requests": sum(b.requests for b in batchers),
            # everything runs started, finished, cancelled; batches decoded; the most a click saw go by
            "everything": dict(self._everything),
        }


def _load_batching(name: str, **options: Any) -> BatchingSegmenter:
    return BatchingSegmenter.wrapping(Segmenter.from_pretrained(name, **options))


class ReplicaStatusRegistry(service.ModelRegistry):
    """The ingress's registry: it names the served models and checks `model`, and reports the models'
    status as a Segmenter replica has it (every replica loads every served model before it takes requests;
    the ingress loads none). Asked from a worker thread (api's /v1/models), at most once a second."""

    def __init__(self, settings: Settings, segmenter: DeploymentHandle, timeout: float = 10.0):
        super().__init__(settings)
        self._segmenter = segmenter
        self._timeout = timeout
        self._lock = threading.Lock()
        self._asked: tuple[float, dict[str, str]] = (-1e9, {})

    def status(self, name: str) -> str:
        with self._lock:
            asked_at, statuses = self._asked
            if time.monotonic() - asked_at > 1.0:
                try:
                    statuses = self._segmenter.model_status.remote().result(timeout_s=self._timeout)
                except Exception as error:  # none running yet, all restarting, ...: say so
                    log.warning("no segmentation replica answered for the models' status: %s", error)
                    statuses = {}
                self._asked = (time.monotonic(), statuses)
        return statuses.get(name, "unavailable: no segmentation replica answered; retry in a few seconds")


@serve.deployment(name="Ingress")
@serve.ingress()
class Ingress:
    """The API process: our routes and error format; each segmentation goes to a Segmenter replica."""

    def __init__(self, segmenter: DeploymentHandle, retries: int = RayOptions.retries):
        # the registry names the served models and checks `model`; it never loads one in this process
        self.settings = dataclasses.replace(Settings.from_env(), device="cpu", preload_examples=False)
        self.registry = ReplicaStatusRegistry(self.settings, segmenter)
        self.segmenter = segmenter
        self.retries = retries

    def __serve_build_asgi_app__(self) -> FastAPI:
        app = FastAPI(title=TITLE, version=VERSION)
        install_api(app, self.registry, self.settings, segment=self.segment, everything=self.everything)
        app.add_middleware(ReplicaHeader)
        return app

    def segment(self, registry: service.ModelRegistry, *, image: Any, model: str | None = None, **options: Any):
        """`service.segment`'s signature, run on the replica that holds the picture (any other keyword
        arguments pass through). Called in a worker thread, so it may block on the handle."""
        return self._ask("segment", registry, image, model, options)

    def everything(
        self,
        registry: service.ModelRegistry,
        *,
        image: Any,
        model: str | None = None,
        batch_context: Any = None,
        progress: Any = None,
        cancelled: Callable[[], bool] | None = None,
        **options: Any,
    ):
        """`service.segment_everything`'s signature, run on the replica that holds the picture (the same picture
        id as a click). `batch_context` and `progress` are this process's callables and cannot cross to the
        replica: there the replica's own gate lets its clicks go first between batches. `cancelled` is read
        here; once true, the Ray call is cancelled and the replica stops the run before its next batch."""
        return self._ask(
            "everything", registry, image, model, options, cancelled or (lambda: False), EVERYTHING_RETRIES
        )

    def _ask(
        self,
        method: str,
        registry: service.ModelRegistry,
        image: Any,
        model: str | None,
        options: dict[str, Any],
        cancelled: Callable[[], bool] | None = None,
        retries: int | None = None,
    ) -> service.SegmentResult:
        """The replica's `method(request)`, retried on another replica (at most `retries` times, default the
        ingress's) when one dies mid-request."""
        retries = self.retries if retries is None else min(retries, self.retries)
        name = registry.check_served(model)
        image = bytes(image)
        handle = self.segmenter.options(multiplexed_model_id=picture_id(name, image))
        request = {"image": image, "model": name, **options}
        for attempt in range(retries + 1):
            try:
                result, replica = _answer(getattr(handle, method).remote(request), cancelled)
            except RayTaskError as error:  # raised on the replica: our errors keep their type and status
                if isinstance(error.cause, SegmentationError):
                    raise error.cause from None
                raise
            except (RayActorError, ActorUnavailableError) as error:  # the replica died: Ray routes the retry elsewhere
                log.warning("segmenter replica lost (%s); try %d of %d", error, attempt + 1, retries + 1)
                if attempt < retries:
                    time.sleep(0.1 * 2**attempt)
                continue
            answered_by(replica)
            if isinstance(result, SegmentationError):
                raise result
            return result
        raise ModelUnavailableError("No segmentation replica answered; retry in a few seconds.")


def _answer(response: DeploymentResponse, cancelled: Callable[[], bool] | None) -> Any:
    """The call's result; with `cancelled`, looked at every POLL_SECONDS: once it is true the call is cancelled
    (Ray cancels the replica's task) and `Cancelled` raised."""
    if cancelled is None:
        return response.result()
    while True:
        if cancelled():
            response.cancel()
            raise Cancelled()
        try:
            return response.result(timeout_s=POLL_SECONDS)
        except TimeoutError:  # Ray's GetTimeoutError is one
            continue


def build(args: dict[str, Any] | None = None) -> serve.Application:
    """The application. `args` (deploy/serve.yaml's `args:`, or the CLI's flags) override RayOptions' env."""
    options = RayOptions.from_env(**(args or {}))
    segmenter = SegmenterReplica.options(
        num_replicas=options.replicas,
        max_ongoing_requests=options.max_ongoing,
        ray_actor_options={"num_cpus": options.cpus, "num_gpus": options.gpus},
        request_router_config=RequestRouterConfig(request_router_class=PictureRouter),
    ).bind(options.max_pictures, options.batch)
    return Ingress.options(
        num_replicas=options.ingress_replicas,
        max_ongoing_requests=max(16, 4 * options.max_ongoing),
        ray_actor_options={"num_cpus": 0},
    ).bind(segmenter, options.retries)


def runtime_env(extra: dict[str, str] | None = None) -> dict[str, Any]:
    """What Ray workers need of this process: the project on PYTHONPATH and the SAMHQ_/HF_ settings."""
    root = str(Path(__file__).resolve().parents[2])
    env = {key: value for key, value in os.environ.items() if key.startswith(FORWARDED_ENV)}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH", "")]))
    return {"env_vars": {**env, **(extra or {})}}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Serve the segmentation API on Ray: a new local cluster on this machine, or --address to join one."
    )
    parser.add_argument("--host", default="127.0.0.1", help="HTTP proxy address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="HTTP proxy port (default 8000)")
    parser.add_argument(
        "--address",
        help="join this running Ray cluster (e.g. 10.0.0.5:6379, or 'auto' for the one `ray start` made here); "
        "default: start a new local cluster, whatever RAY_ADDRESS says",
    )
    parser.add_argument("--replicas", type=int, help="Segmenter replicas (SAMHQ_RAY_REPLICAS, default 2)")
    parser.add_argument("--cpus", type=float, help="CPUs per replica (SAMHQ_RAY_CPUS, default 1)")
    parser.add_argument("--gpus", type=float, help="GPUs per replica (SAMHQ_RAY_GPUS, default 0)")
    parser.add_argument("--max-pictures", type=int, help="picture ids per replica (SAMHQ_RAY_MAX_PICTURES, 48)")
    parser.add_argument("--max-ongoing", type=int, help="requests per replica at once (SAMHQ_RAY_MAX_ONGOING, 16)")
    parser.add_argument("--ingress-replicas", type=int, help="API processes (SAMHQ_RAY_INGRESS_REPLICAS, 1)")
    parser.add_argument(
        "--batch",
        action=argparse.BooleanOptionalAction,
        help="merge decodes on one picture (SAMHQ_RAY_BATCH; auto: on a GPU)",
    )
    parser.add_argument("--cache-mb", type=int, help="embedding cache per replica, MB (SAMHQ_CACHE_MB)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Start (or join) a cluster, run the application, print where things are, and stop cleanly on Ctrl-C
    or SIGTERM: the application and, when this command started it, the local cluster."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.cache_mb is not None:
        os.environ["SAMHQ_CACHE_MB"] = str(args.cache_mb)
    options = {k: v for k, v in vars(args).items() if k not in ("host", "port", "cache_mb", "address")}
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):  # handled here, not as a KeyboardInterrupt deep in Ray's code
        signal.signal(sig, lambda *_: stop.set())
    if args.address:
        context = ray.init(address=args.address, runtime_env=runtime_env())
    else:  # "local": a new cluster even when RAY_ADDRESS or `ray start` names another one
        context = ray.init(
            address="local",
            runtime_env=runtime_env(),
            include_dashboard=True,  # the state API and `serve status` go through it
            dashboard_host="127.0.0.1",
        )
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        serve.run(build(options), name="samhq", route_prefix="/", blocking=False)
        for line in where(context, args):
            log.info("%s", line)
        while not stop.wait(1.0):
            pass
        log.info("stopping: the application, then %s", "Ray's connection" if args.address else "the local cluster")
    finally:
        if not args.address:  # our own cluster: take the application down with it
            serve.shutdown()
        ray.shutdown()
    log.info("stopped")


def where(context: Any, args: argparse.Namespace) -> list[str]:
    """What an operator needs: the API, what Ray wrote where, and how to find a replica's process."""
    info = getattr(context, "address_info", {}) or {}
    session = info.get("session_dir") or "?"
    dashboard = getattr(context, "dashboard_url", None)
    api = f"http://{args.host}:{args.port}"
    lines = [
        f"API: {api}/v1/images/segmentations (models: {api}/v1/models)",
        f"Ray cluster: {info.get('gcs_address', args.address)} ({'joined' if args.address else 'local, started here'})",
        f"Ray writes its session (sockets, logs) under {session}; logs in {Path(session) / 'logs'}",
    ]
    token = Path.home() / ".ray" / "auth_token"
    auth = ""
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "token":  # Ray turned it on for this cluster
        auth = "RAY_AUTH_MODE=token "
        where_token = os.environ.get("RAY_AUTH_TOKEN_PATH") or (token if token.exists() else "RAY_AUTH_TOKEN")
        lines.append(
            f"Ray's token authentication is on: its token is in {where_token}; the ray and serve commands "
            "below send it with RAY_AUTH_MODE=token"
        )
    if dashboard:
        address = dashboard if "://" in dashboard else f"http://{dashboard}"
        # `serve status` reads each deployment's config, which names our router class: the project is imported
        project = f"PYTHONPATH={Path(__file__).resolve().parents[2]} "
        lines += [
            f"dashboard and state API: {address}",
            f"  {auth}{project}serve status --address {address}",
            # Ray's state CLI lets RAY_ADDRESS override --address; RAY_API_SERVER_ADDRESS overrides both
            f"  {auth}RAY_API_SERVER_ADDRESS={address} ray list actors "
            "--filter 'class_name=ServeReplica:samhq:Segmenter' --detail",
            "  (an x-samhq-replica header names a replica: the actor SERVE_REPLICA::samhq#Segmenter#<that id>, "
            "its pid in that list)",
        ]
    lines += [f"replica {name}: pid {pid}" for name, pid in replica_processes(dashboard)]
    lines.append("Ctrl-C stops it")
    return lines


def replica_processes(dashboard: str | None) -> list[tuple[str, int]]:
    """(replica id, pid) of the Segmenter replicas, from Ray's state API (empty when it cannot answer)."""
    if not dashboard:
        return []
    # the state API follows RAY_ADDRESS before its `address` argument; RAY_API_SERVER_ADDRESS before both
    os.environ["RAY_API_SERVER_ADDRESS"] = dashboard if "://" in dashboard else f"http://{dashboard}"
    try:
        from ray.util.state import list_actors

        actors = list_actors(filters=[("state", "=", "ALIVE")], detail=True, timeout=60, raise_on_missing_output=False)
    except Exception as error:  # the state API is a convenience here, never a reason to stop serving
        log.warning("could not list the replicas' processes (%s)", error)
        return []
    prefix = "SERVE_REPLICA::samhq#Segmenter#"
    return sorted((a.name[len(prefix) :], a.pid) for a in actors if (a.name or "").startswith(prefix))


if __name__ == "__main__":
    main()
