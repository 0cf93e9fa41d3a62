"""What the web layers share: the served models (loaded lazily, once) and one segmentation call.

The HTTP API and the Gradio UI both go through here, so a picture embedded by one is a
cache hit for the other, and `segment` enforces the same limits (`segmentation.limits`) for
every way in.

Importing this module does not import torch: the engine is imported when a registry is built or a map is
resized, so the page in front of a remote model server (`app.py --backend`) uses the gate and the result
type without torch installed.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import gc
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .cache import EmbeddingCache
from .errors import ModelUnavailableError, ResourceExhaustedError, SegmentationError, UnknownModelError
from .everything_options import EverythingOptions
from .images import upright_size
from .limits import Limits
from .masks import encode_png, object_stats, resize_nearest, to_numpy_labels
from .models import resolve_device
from .settings import Settings

if TYPE_CHECKING:
    from .engine import Embedding, LabelMap, Segmenter
    from .everything import EverythingResult, Progress

log = logging.getLogger(__name__)

MiB = 1024 * 1024


class OverloadedError(SegmentationError):
    """Too many requests are already waiting for the model."""

    code = "rate_limit_exceeded"


class ModelRegistry:
    """The served models: each loaded on first use, once, even under concurrent first requests.

    A failed load is remembered with its reason (answered at once) and retried after
    `retry_after` seconds, so a server started offline recovers when the weights appear.
    """

    def __init__(
        self,
        settings: Settings,
        loader: Callable[..., Segmenter] | None = None,
        retry_after: float = 15.0,
    ):
        from .engine import Segmenter, make_cache

        self.settings = settings
        self.limits = Limits.from_settings(settings)
        self.served = settings.served_models
        self._loader = loader or Segmenter.from_pretrained
        self.retry_after = retry_after
        device = resolve_device(settings.device)
        self.cache: EmbeddingCache[Embedding] = make_cache(
            device,
            settings.cache_mb * MiB if settings.cache_mb > 0 else None,
            settings.device_cache_mb * MiB if settings.device_cache_mb > 0 else None,
        )
        self._models: dict[str, Segmenter] = {}
        self._failures: dict[str, tuple[float, ModelUnavailableError]] = {}
        self._locks = {name: threading.Lock() for name in self.served}

    @property
    def default(self) -> str:
        return self.settings.model

    def check_served(self, name: str | None) -> str:
        name = name or self.default
        if name not in self.served:
            raise UnknownModelError(
                f"Model {name!r} is not served here. Served models: {', '.join(self.served)}.", param="model"
            )
        return name

    def get(self, name: str | None = None) -> Segmenter:
        """The loaded model, loading it now if needed; raises UnknownModelError / ModelUnavailableError."""
        name = self.check_served(name)
        model = self._models.get(name)
        if model is not None:
            return model
        with self._locks[name]:
            model = self._models.get(name)
            if model is not None:
                return model
            failure = self._failures.get(name)
            if failure and time.monotonic() - failure[0] < self.retry_after:
                raise failure[1]
            try:
                model = self._loader(
                    name,
                    device=self.settings.device,
                    dtype=self.settings.dtype,
                    cache_bytes=self.cache.max_bytes,
                    max_pixels=self.settings.max_pixels,
                    compile=self.settings.compile,
                    decoder=self.settings.decoder,
                )
            except ModelUnavailableError as error:
                self._failures[name] = (time.monotonic(), error)
                log.error("%s", error)
                raise
            model.cache = self.cache  # one byte budget across every served model
            self._failures.pop(name, None)
            self._models[name] = model
            return model

    def status(self, name: str) -> str:
        """'loaded', 'not loaded yet', or the reason the last load failed."""
        if name in self._models:
            return "loaded"
        failure = self._failures.get(name)
        return f"unavailable: {failure[1].message}" if failure else "not loaded yet"

    def loaded(self) -> dict[str, Segmenter]:
        return dict(self._models)


class ClientGone(Exception):
    """The client left while its request waited: it is dropped without running (nothing to answer)."""


class JobSlots:
    """At most `count` long jobs at once ("segment everything" runs), past it `OverloadedError` at once (429):
    a run holds a worker thread for its whole length and takes the model gate once per batch, so unbounded runs
    would hold every thread and fill the queue that clicks wait in."""

    def __init__(self, count: int):
        self._slots = threading.BoundedSemaphore(max(1, count))

    @contextlib.contextmanager
    def take(self, busy_message: str) -> Iterator[None]:
        if not self._slots.acquire(blocking=False):
            raise OverloadedError(busy_message)
        try:
            yield
        finally:
            self._slots.release()


class AdmissionGate:
    """Bounds the requests waiting for the model: past `max_waiting`, refuse at once (HTTP 429).

    A waiting request whose client has left (`abandoned` is set) leaves the queue at once, and
    one that reaches the front after its client left is dropped there, before it runs.
    """

    def __init__(self, max_concurrent: int = 1, max_waiting: int = 16):
        self._slots = max(1, max_concurrent)
        self._free = max(1, max_concurrent)
        self._max_waiting = max_waiting
        self._waiting = 0
        self._ready = threading.Condition()

    @contextlib.contextmanager
    def admit(self, abandoned: threading.Event | None = None) -> Iterator[None]:
        """Wait for a slot; raises OverloadedError when the queue is full, ClientGone when abandoned."""
        gone = abandoned.is_set if abandoned is not None else (lambda: False)
        with self._ready:
            if self._waiting >= self._max_waiting:
                raise OverloadedError("The server is busy: too many requests are waiting. Retry in a few seconds.")
            self._waiting += 1
            try:
                while self._free == 0 and not gone():
                    self._ready.wait(timeout=1.0)  # woken by a release or by `wake`; the timeout is a safety net
            finally:
                self._waiting -= 1
            if gone():
                raise ClientGone()
            self._free -= 1
        try:
            yield
        finally:
            with self._ready:
                self._free += 1
                self._ready.notify()

    @contextlib.contextmanager
    def admit_after_others(self, abandoned: threading.Event | None = None, max_wait: float = 5.0) -> Iterator[None]:
        """`admit`, once no other request holds or waits for a slot (at most `max_wait` s, so a stream of
        requests cannot starve it): a long job's next step ("segment everything"'s batch) lets them go first."""
        deadline = time.monotonic() + max_wait
        with self._ready:
            while (self._waiting or self._free < self._slots) and time.monotonic() < deadline:
                if abandoned is not None and abandoned.is_set():
                    break
                self._ready.wait(timeout=0.01)
        with self.admit(abandoned):
            yield

    def wake(self) -> None:
        """Let waiters look again whether their client is still there (called when one leaves)."""
        with self._ready:
            self._ready.notify_all()


def _load_libc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (musl, macOS, Windows)
        return None


_malloc_trim = _load_libc_trim()


def give_memory_back() -> None:
    """After running out of memory: collect the garbage and return the freed heap to the system (glibc)."""
    gc.collect()
    if _malloc_trim is not None:
        _malloc_trim(0)


def _file_bytes(image: Any) -> int:
    """The size of a picture's file (encoded bytes or a path); 0 for decoded pictures."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        return len(image)
    if isinstance(image, (str, os.PathLike)):
        try:
            return os.path.getsize(image)
        except OSError:
            return 0  # decoding says what is wrong with it
    return 0


def _resized(label_map: LabelMap, width: int, height: int) -> LabelMap:
    """The map at another size; areas and boxes re-measured so they describe the mask returned."""
    from .engine import LabelMap, ObjectResult

    labels = resize_nearest(label_map.labels, width, height)
    stats = object_stats(labels, len(label_map.objects))
    objects = tuple(
        ObjectResult(value=s.value, score=o.score, area=s.area, bbox=s.bbox, point=o.point)
        for s, o in zip(stats, label_map.objects)
    )
    return LabelMap(labels, objects)


@dataclass(frozen=True)
class SegmentResult:
    model: str
    width: int  # of the returned masks
    height: int
    candidates: tuple[LabelMap, ...]
    embedding_cached: bool
    image_tokens: int
    point_tokens: int
    timings: dict[str, float] = field(default_factory=dict)

    def mask_arrays(self) -> list[np.ndarray]:
        return [candidate.labels for candidate in self.candidates]

    def pngs(self) -> list[bytes]:
        return [encode_png(labels) for labels in self.mask_arrays()]


def segment(
    registry: ModelRegistry,
    *,
    image: Any,
    points: Any,
    labels: Any = None,
    boxes: Any = None,
    model: str | None = None,
    candidates: int = 1,
    hq_token_only: bool = False,
    size: tuple[int, int] | None = None,
) -> SegmentResult:
    """Embed (cached) and segment one request; the label maps come back at `size` if given (nearest).

    Every limit of `registry.limits` is checked first, and the prompt is validated against the
    picture's size read from its header, so a request that would be refused never runs the encoder.
    """
    limits = registry.limits
    limits.check(points=points, candidates=candidates, size=size)
    limits.check_picture_bytes(_file_bytes(image))
    segmenter = registry.get(model)
    width, height = upright_size(image, segmenter.max_pixels)
    prompt = limits.check_prompt(points, labels, boxes, width, height, candidates)
    try:
        timings: dict[str, float] = {}
        start = time.perf_counter()
        embedding, cached = segmenter.embed_with_info(image)
        timings["embed"] = time.perf_counter() - start  # decode + encoder, or a cache lookup
        if (embedding.width, embedding.height) != (width, height):  # the header said otherwise: trust the pixels
            prompt = segmenter.parse(
                embedding, points, labels, boxes, max_objects=limits.max_objects, max_points=limits.max_points
            )
        return _run(segmenter, embedding, cached, prompt, timings, candidates, hq_token_only, size)
    except ResourceExhaustedError:  # the engine has shed the cache already
        give_memory_back()
        raise
    except MemoryError as error:  # out of memory outside the model (resizing, measuring the maps)
        registry.cache.shed(0.5)
        give_memory_back()
        raise ResourceExhaustedError(
            "The server ran out of memory while preparing the answer; try again, or ask for a smaller size."
        ) from error


def _run(
    segmenter: Segmenter,
    embedding: Embedding,
    cached: bool,
    prompt: Any,
    timings: dict[str, float],
    candidates: int,
    hq_token_only: bool,
    size: tuple[int, int] | None,
) -> SegmentResult:
    result = segmenter.segment(embedding, prompt, candidates=candidates, hq_token_only=hq_token_only)
    timings.update(result.timings)
    maps = result.candidates
    width, height = embedding.width, embedding.height
    if size is not None and size != (width, height):
        width, height = size
        maps = tuple(_resized(m, width, height) for m in maps)
    return SegmentResult(
        model=segmenter.model_id,
        width=width,
        height=height,
        candidates=maps,
        embedding_cached=cached,
        image_tokens=embedding.grid_tokens,
        point_tokens=prompt.point_count,
        timings=timings,
    )


def segment_everything(
    registry: ModelRegistry,
    *,
    image: Any,
    options: EverythingOptions,
    model: str | None = None,
    hq_token_only: bool = False,
    size: tuple[int, int] | None = None,
    batch_context: Callable[[], contextlib.AbstractContextManager] | None = None,
    progress: Callable[[Progress], None] | None = None,
    cancelled: Callable[[], bool] | None = None,
) -> SegmentResult:
    """Every object of the picture (official SAM-HQ's automatic mask generator, `segmentation.everything`),
    answered like a prompt: one label map whose objects are the masks found, best predicted IoU first.

    The work limit counts grid points (before the picture is decoded); the embedding is the cached one.
    `batch_context` is entered once per batch (the caller's admission gate), so clicks of other users get
    their turn between batches."""
    from .everything import generate

    limits = registry.limits
    limits.check_size(size)
    segmenter = registry.get(model)
    width, height = upright_size(image, segmenter.max_pixels)
    limits.check_everything_work(options.grid_points, width, height)
    try:
        timings: dict[str, float] = {}
        start = time.perf_counter()
        embedding, cached = segmenter.embed_with_info(image)
        timings["embed"] = time.perf_counter() - start
        limits.check_everything_work(options.grid_points, embedding.width, embedding.height)
        found = generate(
            segmenter,
            embedding,
            options,
            hq_token_only=hq_token_only,
            batch_context=batch_context,
            progress=progress,
            cancelled=cancelled,
        )
        timings.update(found.timings)
        return everything_result(segmenter, embedding, cached, found, size, timings)
    except ResourceExhaustedError:
        give_memory_back()
        raise


def everything_result(
    segmenter: Segmenter,
    embedding: Embedding,
    cached: bool,
    found: EverythingResult,
    size: tuple[int, int] | None,
    timings: dict[str, float],
) -> SegmentResult:
    """The masks found as one label map (values 1..K in the generator's order; where masks overlap the highest
    logit wins, as for any prompt; the small-region clean-up's edits honoured, `everything.compose_labels`),
    with each object's score, area and box measured on the map."""
    from .engine import LabelMap, ObjectResult
    from .everything import compose_labels

    start = time.perf_counter()
    width, height = embedding.width, embedding.height
    count = len(found.masks)
    if count:
        labels = to_numpy_labels(
            compose_labels(
                found.logits.to(segmenter.device), found.regions, embedding.resized_size, embedding.original_size
            ),
            count,
        )
    else:
        labels = np.zeros((height, width), dtype=np.uint8)
    objects = tuple(
        ObjectResult(
            value=s.value,
            score=found.masks[s.value - 1].score,
            area=s.area,
            bbox=s.bbox,
            point=tuple(float(v) for v in found.masks[s.value - 1].point),
        )
        for s in object_stats(labels, count)
    )
    label_map = LabelMap(labels, objects)
    if size is not None and size != (width, height):
        width, height = size
        label_map = _resized(label_map, width, height)
    timings["postprocess"] = time.perf_counter() - start
    return SegmentResult(
        model=segmenter.model_id,
        width=width,
        height=height,
        candidates=(label_map,),
        embedding_cached=cached,
        image_tokens=embedding.grid_tokens,
        point_tokens=found.grid_points,
        timings=timings,
    )


# ---- the page's hover preview (ui/preview_routes.py): the browser runs the decoder on a picture's features ----


class PreviewUnavailable(SegmentationError):
    """The served model cannot give the browser a decoder (no HQ features, no export tools): the page says why."""

    code = "preview_unavailable"


def browser_graph_folder() -> Path:
    """Where browser decoder graphs are kept: SAMHQ_ONNX_DIR, else `samhq-onnx` in the Hugging Face cache (the
    models' own folder), so a graph is built once per model and machine, never downloaded."""
    configured = os.environ.get("SAMHQ_ONNX_DIR", "").strip()
    if configured:
        return Path(configured)
    hf_home = os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface")
    return Path(hf_home) / "samhq-onnx"


_graph_lock = threading.Lock()
REPO = Path(__file__).resolve().parent.parent
GRAPH_EXPORT_TIMEOUT = 900.0
_graph_paths: dict[int, tuple[Any, Path]] = {}  # a loaded model's graph, so its weights are hashed once


def browser_decoder_path(registry: ModelRegistry, model: str | None = None, sam_only: bool = False) -> Path:
    """The served model's browser decoder graph (`onnx_graph.export_browser_decoder`), exported on first use into
    `browser_graph_folder()` under a name holding a digest of the decoder's weights (a new checkpoint under the
    same id gets a new graph) and reused after, with its picture graph beside it (`onnx_graph.picture_graph_path`).
    One export at a time in the process (it takes seconds), in a child process. `sam_only`: the graph of SAM's own
    tokens, without the HQ mask (`BrowserDecoder`)."""
    import hashlib
    import subprocess
    import sys

    from .onnx_graph import BROWSER_GRAPHS_VERSION, picture_graph_path

    name = registry.check_served(model)
    segmenter = registry.get(name)
    if not segmenter.hq:
        raise PreviewUnavailable(
            f"The hover preview needs a SAM-HQ model (its HQ features); {segmenter.model_id} has none."
        )
    known = _graph_paths.get((id(segmenter), sam_only))
    if known is not None and known[0] is segmenter and known[1].exists() and picture_graph_path(known[1]).exists():
        return known[1]
    digest = hashlib.sha256()
    for module in (segmenter.model.prompt_encoder, segmenter.model.mask_decoder):
        for key, tensor in module.state_dict().items():
            digest.update(key.encode())
            digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    safe = "".join(c if c.isalnum() or c in "-_." else "-" for c in segmenter.model_id)[-80:]
    variant = ("browser-sam-decoder" if sam_only else "browser-decoder") + f"-v{BROWSER_GRAPHS_VERSION}"
    path = browser_graph_folder() / f"{safe}-{digest.hexdigest()[:16]}-{variant}.onnx"
    with _graph_lock:
        if path.exists() and picture_graph_path(path).exists():
            _graph_paths[(id(segmenter), sam_only)] = (segmenter, path)
            return path
        start = time.perf_counter()
        partial = path.with_name(f"{path.stem}.{os.getpid()}.part.onnx")
        path.parent.mkdir(parents=True, exist_ok=True)
        # In a process of its own: torch.export traces with fake tensors in a mode that is not thread-safe, and a
        # click decoding in another thread of this server meanwhile failed ("fake_mode.in_kernel_invocation").
        # The child loads the same checkpoint (by its served name, from the same cache) and writes the graph.
        command = [sys.executable, "-m", "segmentation.onnx_graph", "--model", name, "--browser", "--out", str(partial)]
        command += ["--sam-only"] if sam_only else []
        try:
            done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=GRAPH_EXPORT_TIMEOUT)
        except subprocess.TimeoutExpired as error:
            partial.unlink(missing_ok=True)
            picture_graph_path(partial).unlink(missing_ok=True)
            raise PreviewUnavailable("Building the hover preview's decoder took too long on this server.") from error
        if done.returncode != 0 or not partial.exists() or not picture_graph_path(partial).exists():
            partial.unlink(missing_ok=True)
            picture_graph_path(partial).unlink(missing_ok=True)
            last = (done.stderr.strip().splitlines() or ["no output"])[-1][:200]
            log.warning("browser decoder for %s failed: %s", segmenter.model_id, last)
            raise PreviewUnavailable(f"The hover preview's decoder cannot be built here ({last}).")
        os.replace(picture_graph_path(partial), picture_graph_path(path))
        os.replace(partial, path)  # whole or absent: a reader never sees half a graph (the decoder last: the mark)
        _graph_paths[(id(segmenter), sam_only)] = (segmenter, path)
        log.info(
            "browser decoder for %s: %.1f s, %.1f MB",
            segmenter.model_id,
            time.perf_counter() - start,
            path.stat().st_size / MiB,
        )
        return path


@dataclass(frozen=True)
class PreviewFeatures:
    """What the browser's decoder needs of one picture, as float16 arrays (`PictureFeatures.tokens` and
    `.hq_features`, None for the SAM-tokens graph, which does not take them), with the sizes it upscales its mask
    by (as `decoder.upscale_logits` does)."""

    key: str
    tokens: np.ndarray  # (1, 1, H*W, C) float16
    hq_features: np.ndarray | None  # (1, C/8, 4H, 4W) float16
    original_size: tuple[int, int]  # (height, width)
    resized_size: tuple[int, int]  # (height, width) inside the 1024 frame

    @property
    def nbytes(self) -> int:
        return self.tokens.nbytes + (self.hq_features.nbytes if self.hq_features is not None else 0)


def preview_features(
    registry: ModelRegistry, model: str, key: str | None, source: Any, with_hq: bool = True
) -> PreviewFeatures:
    """A picture's features for the browser: its embedding from the cache by `key`, else computed from `source`
    (the picture's file) through the same limits as any embed. Without `with_hq`, no HQ features (the SAM-tokens
    graph's page need not fetch them)."""
    import torch

    segmenter = registry.get(model)
    if not segmenter.hq:
        raise PreviewUnavailable(
            f"The hover preview needs a SAM-HQ model (its HQ features); {segmenter.model_id} has none."
        )
    embedding = segmenter.cached(key) if key else None
    if embedding is None:
        embedding, _ = segmenter.embed_with_info(source)
    features = embedding.features

    def half(tensor: torch.Tensor) -> np.ndarray:
        return tensor.detach().to("cpu", torch.float16).contiguous().numpy()

    return PreviewFeatures(
        embedding.key,
        half(features.tokens),
        half(features.hq_features) if with_hq else None,
        tuple(embedding.original_size),
        tuple(embedding.resized_size),
    )
