"""The engine: embed a picture once, segment it from point prompts again and again.

    segmenter = Segmenter.from_pretrained("syscv-community/sam-hq-vit-base")
    embedding = segmenter.embed("photo.jpg")          # seconds on a CPU, cached
    result = segmenter.segment(embedding, [[[120, 80]], [[300, 200], [320, 260]]])
    result.label_maps[0]                              # HxW uint8: 0 background, 1, 2 objects

As with `SamPredictor.set_image()` / `predict()`, the split is explicit: `embed()` computes
and caches what depends on the picture alone, `segment()` runs only the prompt decoder.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from . import decoder as dec
from .cache import CacheStats, EmbeddingCache
from .errors import InvalidPromptError, ModelUnavailableError, ResourceExhaustedError
from .images import DEFAULT_MAX_PIXELS, ImageInput, encoded_digest, load_image, pixel_hash
from .masks import compose_label_map, object_stats, to_numpy_labels
from .models import LoadedModel, half_precision_candidate, load_model, parse_dtype, resolve_device
from .prompts import Prompt, model_frame_arrays, parse_prompt

log = logging.getLogger(__name__)

MAX_CANDIDATES = 3
MiB = 1024 * 1024
# Objects per decoder call. Each object in flight holds its refined embedding and upscaled mask
# features (about 40 MB at ViT-B sizes in float32); chunks of 8 keep a 255-object decode a few
# hundred MB above idle on a CPU (docs/PERFORMANCE.md) while a click's few objects still run as one call.
MAX_DECODE_BATCH = 8


@dataclass(frozen=True, eq=False)
class Embedding:
    """Everything the decoder needs of one picture. Immutable and shared between callers."""

    model_id: str
    key: str  # pixel hash of the decoded RGB picture
    original_size: tuple[int, int]  # (height, width) of the upright picture
    resized_size: tuple[int, int]  # (height, width) inside the model's 1024 frame
    features: dec.PictureFeatures  # what the decoder needs of the picture, computed once
    timings: dict[str, float] = field(default_factory=dict, compare=False)  # seconds it took to make

    @property
    def width(self) -> int:
        return self.original_size[1]

    @property
    def height(self) -> int:
        return self.original_size[0]

    @property
    def nbytes(self) -> int:
        return self.features.nbytes

    def to(self, device: torch.device | str) -> Embedding:
        """The same embedding with its tensors on `device` (host copies are pinned for fast transfers back)."""
        device = torch.device(device)
        pin = device.type == "cpu" and torch.cuda.is_available()
        return dataclasses.replace(self, features=self.features.to(device, pin=pin))

    @property
    def grid_tokens(self) -> int:
        """Image tokens: cells of the embedding grid (64×64 for every published checkpoint)."""
        height, width = self.features.grid
        return height * width


@dataclass(frozen=True)
class ObjectResult:
    value: int  # its value in the label map
    score: float  # predicted IoU of the chosen candidate
    area: int
    bbox: tuple[int, int, int, int] | None  # x0, y0, x1, y1 inclusive
    candidate: int = 0  # which of the object's ranked candidates this map uses
    candidates: int = 1  # how many distinct candidates the object has (3 for one point, else 1)
    point: tuple[float, float] | None = None  # segment everything: the grid point whose mask this is


@dataclass(frozen=True)
class LabelMap:
    labels: np.ndarray  # (H, W) uint8 / uint16
    objects: tuple[ObjectResult, ...]

    @property
    def score(self) -> float:
        """Mean predicted IoU of its objects."""
        return float(np.mean([obj.score for obj in self.objects])) if self.objects else 0.0


@dataclass(frozen=True)
class Segmentation:
    candidates: tuple[LabelMap, ...]  # n label maps, best first
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage

    @property
    def label_maps(self) -> list[np.ndarray]:
        return [candidate.labels for candidate in self.candidates]

    @property
    def best(self) -> LabelMap:
        return self.candidates[0]


@dataclass(frozen=True, eq=False)
class Decoded:
    """A prompt decoded on one picture: each object's candidates, best first, ready to be composed
    into label maps as often as needed (picking another candidate needs no second decode)."""

    embedding_key: str
    prompt: Prompt
    hq_token_only: bool  # as applied: always False for a model without the HQ token
    logits: torch.Tensor  # (N, 3, 256, 256) low-resolution logits, on the model's device until on_host()
    scores: np.ndarray  # (N, 3) predicted IoU of each candidate
    counts: tuple[int, ...]  # distinct candidates per object: 3 for a single point, else 1
    timings: dict[str, float] = field(default_factory=dict)

    def is_for(self, embedding_key: str, prompt: Prompt, hq_token_only: bool) -> bool:
        return (self.embedding_key, self.prompt, self.hq_token_only) == (embedding_key, prompt, hq_token_only)

    def on_host(self) -> Decoded:
        """A copy with the logits in host memory (under 1 MB per object), for keeping in a session:
        GPU memory outside the cache's budget is not spent on it, and it pickles anywhere."""
        return dataclasses.replace(self, logits=self.logits.cpu())

    def part(self, index: int) -> ObjectDecode:
        """Object `index`'s share of this decode, compact and in host memory: what a caller keeps per object
        so that an edit decodes only the objects it changes (`from_parts` puts a Decoded back together)."""
        count = self.counts[index]
        logits = self.logits[index, :count].to("cpu").clone()  # a copy: never a view pinning the whole batch
        return ObjectDecode(logits=logits, scores=self.scores[index].copy(), count=count)

    @classmethod
    def from_parts(
        cls,
        embedding_key: str,
        prompt: Prompt,
        hq_token_only: bool,
        parts: Sequence[ObjectDecode],
        timings: dict[str, float] | None = None,
    ) -> Decoded:
        """The Decoded of `prompt` from its objects' parts (in the prompt's order): the same logits and
        scores a decode of the whole prompt gives, since each object is decoded as if alone."""
        if len(parts) != len(prompt):
            raise ValueError(f"{len(parts)} parts for a prompt of {len(prompt)} objects")
        rows = [part.logits[[min(i, part.count - 1) for i in range(MAX_CANDIDATES)]] for part in parts]
        return cls(
            embedding_key=embedding_key,
            prompt=prompt,
            hq_token_only=hq_token_only,
            logits=torch.stack(rows),
            scores=np.stack([part.scores for part in parts]),
            counts=tuple(part.count for part in parts),
            timings=dict(timings or {}),
        )


@dataclass(frozen=True, eq=False)
class ObjectDecode:
    """One object's decode: its distinct ranked candidates (count, 256, 256) on the host, and the scores
    of all MAX_CANDIDATES ranks (an object with one candidate repeats it, as `Decoded` does)."""

    logits: torch.Tensor
    scores: np.ndarray
    count: int

    @property
    def nbytes(self) -> int:
        return self.logits.element_size() * self.logits.nelement() + self.scores.nbytes


def default_cache_bytes(device: torch.device) -> int:
    """Host RAM is plentiful next to a GPU's; a ViT-B entry is 18 MB in float32, 9 MB in half precision."""
    return (2048 if device.type == "cuda" else 1024) * MiB


def make_cache(
    device: torch.device, max_bytes: int | None = None, device_bytes: int | None = None
) -> EmbeddingCache[Embedding]:
    """The embedding cache for models on `device`: on an accelerator, up to `device_bytes` (default
    a quarter of its memory, at most 1 GiB) stay on it and the rest spill to host memory."""
    max_bytes = default_cache_bytes(device) if max_bytes is None else max_bytes
    if device.type == "cpu":
        return EmbeddingCache(max_bytes)
    if device_bytes is None:
        total = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else 4096 * MiB
        device_bytes = min(1024 * MiB, total // 4)
    host = torch.device("cpu")
    return EmbeddingCache(
        max_bytes, device_bytes=device_bytes, to_host=lambda e: e.to(host), to_device=lambda e: e.to(device)
    )


def _is_out_of_memory(error: BaseException) -> bool:
    """CUDA's OutOfMemoryError, Python's MemoryError, and the RuntimeErrors other allocators raise:
    "... out of memory" (CUDA, MPS) and the CPU's "DefaultCPUAllocator: can't allocate memory"."""
    if isinstance(error, MemoryError) or isinstance(error, getattr(torch, "OutOfMemoryError", ())):
        return True
    if not isinstance(error, RuntimeError):
        return False
    message = str(error).lower()
    return any(sign in message for sign in ("out of memory", "can't allocate memory", "cannot allocate memory"))


class Segmenter:
    """One loaded model, its embedding cache, and the embed/segment operations.

    Thread-safe: encodes run one at a time (they are the memory peak); decodes run
    alongside them, so a click on a cached picture never queues behind another picture's encode.
    """

    def __init__(self, loaded: LoadedModel, cache: EmbeddingCache | None = None, max_pixels: int = DEFAULT_MAX_PIXELS):
        self.loaded = loaded
        self.model = loaded.model
        self.cache: EmbeddingCache[Embedding] = cache if cache is not None else make_cache(loaded.device)
        self.max_pixels = max_pixels
        self.hq = dec.is_hq(self.model)
        self._positions = dec.positional_tokens(self.model)
        self.onnx_decoder = None  # an onnx_decoder.OnnxDecoder when `use_decoder` chose ONNX Runtime
        self._encode_lock = threading.Lock()
        self._decodes_running = 0  # clicks' decodes in flight: a "segment everything" run yields to them
        self._quiet = threading.Condition()

    @classmethod
    def from_pretrained(
        cls,
        name: str,
        *,
        device: str = "auto",
        dtype: str = "auto",
        cache_bytes: int | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        compile: bool = False,
        decoder: str = "torch",
    ) -> Segmenter:
        """Load `name` (hub id or folder). dtype `auto`: float32 on CPU; on GPU the half precision
        whose masks agree with float32 on a test picture, else float32. `compile`: see `compile_encoder`.
        `decoder`: torch, onnx or auto (see `use_decoder`)."""
        torch_device = resolve_device(device)
        explicit = parse_dtype(dtype)
        loaded = load_model(name, torch_device, explicit)
        cache = make_cache(torch_device, cache_bytes)
        segmenter = cls(loaded, cache, max_pixels)
        if explicit is None:
            candidate = half_precision_candidate(torch_device)
            if candidate is not None:
                segmenter = segmenter.with_precision_if_agreeing(candidate)
        if compile:
            segmenter.compile_encoder()
        segmenter.use_decoder(decoder)
        return segmenter

    def use_decoder(self, setting: str) -> str:
        """Run the prompt decoder on torch, ONNX Runtime (`onnx`), or whichever is faster here (`auto`);
        see `onnx_decoder.choose_decoder`. Returns the backend in effect: "torch" or "onnx"."""
        from .onnx_decoder import choose_decoder, parse_decoder

        setting = parse_decoder(setting)
        self.onnx_decoder = None
        if setting != "torch":
            self.onnx_decoder = choose_decoder(
                setting, self.model, self.model_id, self.device, self.dtype, self._positions
            )
        return self.decoder_backend

    @property
    def decoder_backend(self) -> str:
        return "torch" if self.onnx_decoder is None else "onnx"

    def _run_decoder(self, features: dec.PictureFeatures, points, labels, boxes) -> dec.DecoderOutput:
        if self.onnx_decoder is not None:
            return self.onnx_decoder(features, points, labels, boxes)
        return dec.decode(self.model, features, self._positions, points, labels, boxes)

    def compile_encoder(self) -> float:
        """`torch.compile` the image encoder and pay the compilation now, on a blank picture, not on a
        visitor's first click. Returns the seconds it took. Off by default: on a CPU it costs far more
        than it saves (docs/PERFORMANCE.md); worth measuring on a GPU."""
        start = time.perf_counter()
        self.model.vision_encoder = torch.compile(self.model.vision_encoder, dynamic=False)
        size = self.loaded.processor.image_processor.pad_size
        blank = torch.zeros(1, 3, size["height"], size["width"], device=self.device, dtype=self.dtype)
        dec.encode(self.model, blank)
        seconds = time.perf_counter() - start
        log.info("%s: image encoder compiled in %.1f s", self.model_id, seconds)
        return seconds

    @property
    def model_id(self) -> str:
        return self.loaded.id

    @property
    def device(self) -> torch.device:
        return self.loaded.device

    @property
    def dtype(self) -> torch.dtype:
        return self.loaded.dtype

    # ---- pictures -------------------------------------------------------------------------

    def prepare(self, image: ImageInput | np.ndarray) -> np.ndarray:
        """Decode any accepted input to the upright RGB array that prompts refer to."""
        return load_image(image, self.max_pixels)

    def cache_key(self, rgb: np.ndarray) -> str:
        return f"{self._key_prefix}|{pixel_hash(rgb)}"

    @property
    def _key_prefix(self) -> str:
        """Models may share one cache: every key names the model and precision that made it."""
        return f"{self.model_id}|{str(self.dtype).replace('torch.', '')}"

    def embed(self, image: ImageInput) -> Embedding:
        """The picture's embedding, from the cache or by running the encoder once."""
        return self.embed_with_info(image)[0]

    def embed_with_info(self, image: ImageInput, *, key: str | None = None) -> tuple[Embedding, bool]:
        """(embedding, was_cached). `key` skips hashing when the caller already knows it.

        Encoded bytes seen before (the HTTP API's case: a client sends the same file with
        every click) find their embedding by a digest of the bytes, without decoding them.
        """
        digest = encoded_digest(image) if key is None else None
        source = f"{self._key_prefix}|{digest}" if digest else None
        if source is not None and (known := self.cache.get_by_alias(source)) is not None:
            return known, True
        rgb = self.prepare(image)
        key = key or self.cache_key(rgb)
        embedding, cached = self.cache.get_or_compute(key, lambda: self._encode(rgb, key))
        if source is not None:
            self.cache.link(source, key)
        return embedding, cached

    def cached(self, key: str) -> Embedding | None:
        """The embedding under `key` if it is still cached (no hashing, no encode)."""
        return self.cache.get(key)

    def _encode(self, rgb: np.ndarray, key: str) -> Embedding:
        with self._encode_lock, self._out_of_memory_guard("processing the picture"):
            return self._encode_unlocked(rgb, key)

    @contextlib.contextmanager
    def _out_of_memory_guard(self, doing: str):
        """Out of memory → shed half the cache, free the allocator, raise ResourceExhaustedError (a retry may work)."""
        try:
            yield
        except Exception as error:
            if not _is_out_of_memory(error):
                raise
            freed = self.cache.shed(0.5)
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            log.warning("out of memory while %s; shed %.1f MB of cache", doing, freed / MiB)
            raise ResourceExhaustedError(
                f"The server ran out of memory while {doing}; try again, or use a smaller picture or fewer objects."
            ) from error

    def _encode_unlocked(self, rgb: np.ndarray, key: str) -> Embedding:
        start = time.perf_counter()
        # channels_last said outright: left to guess, the processor takes a picture 3 pixels or fewer high
        # (1x1, 5x3, 64x1) for channels first and returns a mask of the wrong size
        inputs = self.loaded.processor.image_processor(
            images=rgb, return_tensors="pt", input_data_format="channels_last"
        )
        pixel_values = inputs["pixel_values"].to(self.device, self.dtype)
        preprocess = time.perf_counter() - start
        start = time.perf_counter()
        image_embeddings, vit_features = dec.encode(self.model, pixel_values)
        features = dec.picture_features(self.model, image_embeddings, vit_features, self._positions)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        timings = {"preprocess": preprocess, "encoder": time.perf_counter() - start}
        original = tuple(int(v) for v in inputs["original_sizes"][0])
        resized = tuple(int(v) for v in inputs["reshaped_input_sizes"][0])
        return Embedding(self.model_id, key, original, resized, features, timings)

    # ---- prompts --------------------------------------------------------------------------

    def parse(self, embedding: Embedding, points: Any, labels: Any = None, boxes: Any = None, **limits: int) -> Prompt:
        """Validate points (objects → points → [x, y]), labels and boxes (one [x0, y0, x1, y1] or None per
        object) against this picture's size."""
        return parse_prompt(points, labels, boxes, width=embedding.width, height=embedding.height, **limits)

    def segment(
        self,
        embedding: Embedding,
        prompt: Prompt | Sequence,
        labels: Any = None,
        boxes: Any = None,
        *,
        candidates: int = 1,
        hq_token_only: bool = False,
        choices: Sequence[Sequence[int]] | None = None,
    ) -> Segmentation:
        """Decode every object of `prompt` (batched, see `decode`) and compose `candidates` label maps.

        `prompt` is a Prompt or nested lists `[[[x, y], ...], ...]` (then `labels` may give 1/0 per point
        and `boxes` one `[x0, y0, x1, y1]` or None per object).
        The i-th map uses each object's i-th ranked candidate; `choices` instead lists, per map, the
        candidate (0-2) of each object, e.g. the UI's "object 2 takes its second candidate".
        """
        if not isinstance(prompt, Prompt):
            self._check_model(embedding)
            prompt = self.parse(embedding, prompt, labels, boxes)
        plans = self._candidate_plans(len(prompt), candidates, choices)  # bad options fail before the decode
        decoded = self.decode(embedding, prompt, hq_token_only=hq_token_only)
        segmentation = self._compose(embedding, decoded, plans)
        return dataclasses.replace(segmentation, timings={**decoded.timings, **segmentation.timings})

    def decode(
        self,
        embedding: Embedding,
        prompt: Prompt | Sequence,
        labels: Any = None,
        boxes: Any = None,
        *,
        hq_token_only: bool = False,
        reuse: Decoded | None = None,
        max_batch: int | None = None,
    ) -> Decoded:
        """Run the prompt decoder: every object's ranked candidates, kept on the model's device.

        Each object gets the mask official SAM-HQ gives it alone: objects are decoded in groups of
        the same token layout (point count, box or not), never padded to each other, at most
        `max_batch` (default MAX_DECODE_BATCH) objects per decoder call, and put back in the prompt's order.

        Keep the result to compose other choices of candidates (`compose`) without decoding again;
        pass it back as `reuse` and it is returned as is when it answers the same prompt on the same
        picture with the same HQ setting.
        """
        self._check_model(embedding)
        if not isinstance(prompt, Prompt):
            prompt = self.parse(embedding, prompt, labels, boxes)
        hq_token_only = bool(hq_token_only and self.hq)
        if reuse is not None and reuse.is_for(embedding.key, prompt, hq_token_only):
            return reuse
        start = time.perf_counter()
        with self._decoding(), self._out_of_memory_guard("segmenting"):
            batch = MAX_DECODE_BATCH if max_batch is None else max_batch
            logits, scores, counts = self._decode_groups(embedding, prompt, hq_token_only, batch)
            host_scores = scores.float().cpu().numpy()  # also waits for the device to finish the decode
        return Decoded(
            embedding_key=embedding.key,
            prompt=prompt,
            hq_token_only=hq_token_only,
            logits=logits,
            scores=host_scores,
            counts=tuple(counts.tolist()),
            timings={"decoder": time.perf_counter() - start},
        )

    @contextlib.contextmanager
    def _decoding(self):
        """Marks a decode (a click) as running, so `everything.generate` starts no batch meanwhile."""
        with self._quiet:
            self._decodes_running += 1
        try:
            yield
        finally:
            with self._quiet:
                self._decodes_running -= 1
                self._quiet.notify_all()

    def wait_for_quiet(self, timeout: float) -> None:
        """Wait (at most `timeout` s) until no decode is running: how a long run lets clicks go first."""
        with self._quiet:
            self._quiet.wait_for(lambda: self._decodes_running == 0, timeout=timeout)

    def _decode_groups(
        self, embedding: Embedding, prompt: Prompt, hq_token_only: bool, max_batch: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(logits (N, 3, h, w), scores (N, 3), counts (N,)) in the prompt's order, decoded layout group by
        layout group, `max_batch` objects at a time."""
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        n_objects = len(prompt)
        logits = scores = None
        counts = torch.empty(n_objects, dtype=torch.int64, device=self.device)
        sizes = (embedding.original_size, embedding.resized_size)
        for group in prompt.layout_groups():
            for first in range(0, len(group), max_batch):
                rows = group[first : first + max_batch]
                points, labels, boxes = model_frame_arrays([prompt.objects[i] for i in rows], *sizes)
                points_t = labels_t = boxes_t = None
                if points is not None:
                    points_t = torch.as_tensor(points, dtype=self.dtype, device=self.device)
                    labels_t = torch.as_tensor(labels, dtype=torch.int64, device=self.device)
                if boxes is not None:
                    boxes_t = torch.as_tensor(boxes, dtype=self.dtype, device=self.device)
                output = self._run_decoder(embedding.features, points_t, labels_t, boxes_t)
                ambiguous = torch.full((len(rows),), prompt.objects[rows[0]].ambiguous, device=self.device)
                ranked = dec.rank_candidates(output, ambiguous, hq_token_only=hq_token_only)
                if logits is None:
                    logits = ranked.logits.new_empty((n_objects, *ranked.logits.shape[1:]))
                    scores = ranked.scores.new_empty((n_objects, *ranked.scores.shape[1:]))
                index = torch.as_tensor(rows, device=self.device)
                logits[index] = ranked.logits
                scores[index] = ranked.scores
                counts[index] = ranked.counts
                del output, ranked  # the next chunk reuses the memory
        return logits, scores, counts

    def compose(
        self,
        embedding: Embedding,
        decoded: Decoded,
        *,
        candidates: int = 1,
        choices: Sequence[Sequence[int]] | None = None,
    ) -> Segmentation:
        """Label maps from a decode, as `segment` makes them (same `candidates` and `choices`)."""
        if decoded.embedding_key != embedding.key:
            raise ValueError("This decode belongs to another picture.")
        return self._compose(embedding, decoded, self._candidate_plans(len(decoded.prompt), candidates, choices))

    def _compose(self, embedding: Embedding, decoded: Decoded, plans: list[list[int]]) -> Segmentation:
        start = time.perf_counter()
        n_objects = len(decoded.prompt)
        maps = []
        rows = torch.arange(n_objects, device=self.device)
        with self._out_of_memory_guard("segmenting"):
            logits = decoded.logits.to(self.device)  # kept on the host (`on_host`), it comes back here
            for plan in plans:
                chosen = logits[rows, torch.as_tensor(plan, device=self.device)]
                labels_map = to_numpy_labels(
                    compose_label_map(chosen, embedding.resized_size, embedding.original_size), n_objects
                )
                objects = tuple(
                    ObjectResult(
                        value=s.value,
                        score=float(decoded.scores[s.value - 1, plan[s.value - 1]]),
                        area=s.area,
                        bbox=s.bbox,
                        candidate=min(plan[s.value - 1], decoded.counts[s.value - 1] - 1),
                        candidates=decoded.counts[s.value - 1],
                    )
                    for s in object_stats(labels_map, n_objects)
                )
                maps.append(LabelMap(labels_map, objects))
        return Segmentation(candidates=tuple(maps), timings={"postprocess": time.perf_counter() - start})

    def _check_model(self, embedding: Embedding) -> None:
        if embedding.model_id != self.model_id:
            raise ValueError(f"This embedding was made by {embedding.model_id!r}, not {self.model_id!r}")

    @staticmethod
    def _candidate_plans(n_objects: int, candidates: int, choices: Sequence[Sequence[int]] | None) -> list[list[int]]:
        """Per label map, the candidate index of every object (an object with one mask repeats it)."""
        if isinstance(candidates, bool) or not isinstance(candidates, int) or not 1 <= candidates <= MAX_CANDIDATES:
            raise InvalidPromptError(
                f"candidates (n) must be an integer from 1 to {MAX_CANDIDATES}, got {candidates!r}.", param="n"
            )
        if choices is None:
            return [[i] * n_objects for i in range(candidates)]
        plans = [list(plan) for plan in choices]
        if not 1 <= len(plans) <= MAX_CANDIDATES or any(len(plan) != n_objects for plan in plans):
            raise InvalidPromptError(
                f"choices must list 1 to {MAX_CANDIDATES} maps, each with one candidate index per object ({n_objects}).",
                param="choices",
            )
        if any(isinstance(c, bool) or not isinstance(c, int) or not 0 <= c < MAX_CANDIDATES for p in plans for c in p):
            raise InvalidPromptError("candidate indexes in choices must be 0, 1 or 2.", param="choices")
        return plans

    def segment_image(
        self, image: ImageInput, points: Sequence, labels: Any = None, boxes: Any = None, **options: Any
    ) -> Segmentation:
        """Embed (cached) and segment in one call, for notebooks and scripts."""
        return self.segment(self.embed(image), points, labels, boxes, **options)

    # ---- precision ------------------------------------------------------------------------

    def with_precision_if_agreeing(self, dtype: torch.dtype, min_iou: float = 0.98) -> Segmenter:
        """A Segmenter in `dtype` if its masks agree with float32 on a test picture, else self."""
        from .precision import masks_agree

        try:
            loaded = load_model(self.model_id, self.device, dtype)
        except ModelUnavailableError:
            return self
        candidate = Segmenter(loaded, make_cache(self.device, self.cache.max_bytes), self.max_pixels)
        agree, iou = masks_agree(self, candidate, min_iou)
        log.info(
            "%s: %s masks agree with float32 at IoU %.4f: %s",
            self.model_id,
            dtype,
            iou,
            "using it" if agree else "keeping float32",
        )
        return candidate if agree else self

    def cache_stats(self) -> CacheStats:
        return self.cache.stats()


__all__ = [
    "Decoded",
    "ObjectDecode",
    "Embedding",
    "LabelMap",
    "ObjectResult",
    "Segmentation",
    "Segmenter",
]
