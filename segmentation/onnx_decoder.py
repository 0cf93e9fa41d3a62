"""The prompt decoder on ONNX Runtime: the server graph of `onnx_graph`, run behind `Segmenter.decode`.

The graph takes the cached `PictureFeatures` as they are and returns what `decoder.DecoderOutput` holds,
so ranking, composing and every caller above stay the same; only the decoder call changes. Its inputs
and outputs are numpy views of the torch tensors (no copies on either side).

The graph is never downloaded: it is exported from the loaded weights (`python -m segmentation.onnx_graph`,
or at load time) and cached under the Hugging Face cache, in `HF_HOME/samhq-onnx/`, named by the model id
and a fingerprint of what the graph depends on (the prompt encoder's and decoder's weights and norms, the
decode's source, torch's version), so new weights or code never meet a stale graph.

`SAMHQ_DECODER` (`--decoder`) picks the backend at load (`choose_decoder`):
  torch   the torch decode (every device);
  onnx    ONNX Runtime on the CPU (float32); elsewhere, or if the runtime or the export fails, torch;
  auto    ONNX Runtime where a side-by-side timing on a synthetic click at load finds it faster, else torch.
          On a GPU torch: the graph runs on ONNX Runtime's CPU provider only.
Whatever falls back to torch says so in one log line. onnxruntime is imported only here, and only then.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import os
import re
import statistics
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

from . import decoder as dec
from . import onnx_graph
from .settings import DECODERS

log = logging.getLogger(__name__)

GRAPH_FORMAT = 1  # bump when the server graph's inputs or outputs change
# Parity demanded of a freshly loaded graph before it serves (relative to the logits' size): the graph
# matches the torch decode to ~1e-5 (tests/test_onnx_decoder.py); a broken runtime misses by far more.
LOAD_CHECK_TOLERANCE = 1e-3
_export_lock = threading.Lock()


def parse_decoder(name: str | None) -> str:
    value = (name or "auto").strip().lower()
    if value not in DECODERS:
        raise ValueError(f"Unknown decoder {name!r}: use auto, torch or onnx (SAMHQ_DECODER / --decoder)")
    return value


def graph_dir() -> Path:
    """Where server graphs are cached: beside the models, under HF_HOME."""
    from huggingface_hub import constants

    return Path(constants.HF_HOME) / "samhq-onnx"


def graph_fingerprint(model) -> str:
    """A digest of everything the exported graph depends on: the prompt encoder's and mask decoder's weights,
    their norms' epsilons, the attention implementation, the decode's source code and torch's version."""
    digest = hashlib.sha256(f"format {GRAPH_FORMAT} torch {torch.__version__}".encode())
    digest.update(str(getattr(model.config, "_attn_implementation", "")).encode())
    for part in ("prompt_encoder", "mask_decoder"):
        module = getattr(model, part)
        for name, tensor in sorted(module.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
        for name, sub in module.named_modules():
            if hasattr(sub, "eps"):
                digest.update(f"{name}:{sub.eps}".encode())
    for source in (dec, onnx_graph):
        digest.update(inspect.getsource(source).encode())
    return digest.hexdigest()[:20]


def cached_server_graph(model, model_id: str, directory: Path | None = None) -> Path:
    """The server graph of `model`, exported now unless a graph of these weights and this code is cached.
    Written under a temporary name and renamed: concurrent loads never read a half-written file."""
    directory = Path(directory) if directory is not None else graph_dir()
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "--", model_id.strip("/"))[-80:]
    path = directory / f"{slug}-{graph_fingerprint(model)}.onnx"
    if path.exists():
        return path
    with _export_lock:
        if path.exists():
            return path
        directory.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        handle, temporary = tempfile.mkstemp(dir=directory, prefix=path.stem, suffix=".part")
        os.close(handle)
        try:
            onnx_graph.export_server_decoder(model, Path(temporary))
            os.replace(temporary, path)
        finally:
            Path(temporary).unlink(missing_ok=True)
        log.info("%s: decoder exported to ONNX in %.1f s: %s", model_id, time.perf_counter() - start, path)
    return path


class OnnxDecoder:
    """One ONNX Runtime session over a server graph; callable like `decoder.decode` without model and positions.
    Thread-safe (ONNX Runtime's `run` is); its intra-op threads are torch's count, so either backend uses
    the cores `fit_cpu_threads` allowed."""

    def __init__(self, path: Path, threads: int | None = None):
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.inter_op_num_threads = 1
        options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3  # warnings about unused initializers and the like: not the caller's concern
        # No spinning between runs: idle pool threads would take the cores from the torch work around each decode
        # (ranking, composing the label map, the next picture's encoder); measured no slower per decode.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.path = Path(path)
        self.session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.inputs = {i.name for i in self.session.get_inputs()}
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.hq = "hq_features" in self.inputs

    def __call__(
        self,
        picture: dec.PictureFeatures,
        points: torch.Tensor | None,
        labels: torch.Tensor | None,
        boxes: torch.Tensor | None = None,
    ) -> dec.DecoderOutput:
        """`decoder.decode` of N objects of one layout (same arguments, 1024 frame), on ONNX Runtime."""
        coords, kinds = onnx_graph.meta_prompt(
            None if points is None else points.numpy(),
            None if labels is None else labels.numpy(),
            None if boxes is None else boxes.numpy(),
        )
        feeds = {
            "tokens": picture.tokens.numpy(),
            "keys": picture.keys.numpy(),
            "values": picture.values.numpy(),
            "queries": picture.queries.numpy(),
            "coords": coords,
            "labels": kinds,
        }
        if self.hq:
            if picture.hq_features is None:
                raise ValueError("this SAM-HQ graph needs the picture's HQ features")
            feeds["hq_features"] = picture.hq_features.numpy()
        results = self._run(feeds, n_objects=coords.shape[0], grid=picture.grid)
        hq_masks = results.get("hq_masks")
        return dec.DecoderOutput(
            sam_masks=torch.from_numpy(results["sam_masks"]),
            hq_masks=None if hq_masks is None else torch.from_numpy(hq_masks),
            iou=torch.from_numpy(results["iou"]),
        )

    def _run(self, feeds: dict[str, np.ndarray], n_objects: int, grid: tuple[int, int]) -> dict[str, np.ndarray]:
        """One run with every input and output bound to numpy memory (IOBinding): ONNX Runtime reads the cached
        features in place and writes the masks straight into the arrays torch then wraps, no copies."""
        size = (4 * grid[0], 4 * grid[1])
        shapes = {"sam_masks": (n_objects, 4, *size), "iou": (n_objects, 4), "hq_masks": (n_objects, 1, *size)}
        outputs = {name: np.empty(shapes[name], dtype=np.float32) for name in self.outputs}
        binding = self.session.io_binding()
        for name, array in feeds.items():
            binding.bind_cpu_input(name, np.ascontiguousarray(array, dtype=np.float32))
        for name, array in outputs.items():
            binding.bind_output(name, "cpu", 0, np.float32, list(array.shape), array.ctypes.data)
        self.session.run_with_iobinding(binding)
        return outputs


def synthetic_picture(model, positions: torch.Tensor, seed: int = 0) -> dec.PictureFeatures:
    """Picture features of random embeddings: a stand-in picture for the load-time check and timing."""
    generator = torch.Generator().manual_seed(seed)
    height, width = (int(v) for v in model.prompt_encoder.image_embedding_size)
    channels = model.prompt_encoder.no_mask_embed.weight.shape[1]
    embeddings = torch.randn(1, channels, height, width, generator=generator)
    vit = None
    if dec.is_hq(model):
        vit_dim = model.mask_decoder.compress_vit_conv1.in_channels
        vit = torch.randn(1, height, width, vit_dim, generator=generator)
    return dec.picture_features(model, embeddings, vit, positions)


def _synthetic_click() -> tuple[torch.Tensor, torch.Tensor]:
    """One include point: the common click, and the layout a warm click is timed on."""
    return torch.tensor([[[412.0, 287.0]]]), torch.tensor([[1]])


def matches_torch(onnx: OnnxDecoder, model, picture: dec.PictureFeatures, positions: torch.Tensor) -> float:
    """The largest difference between the graph's and the torch decode's outputs on a synthetic prompt (points
    and a box), relative to the outputs' size."""
    points = torch.tensor([[[100.0, 200.0], [700.0, 650.0]]])
    labels = torch.tensor([[1, 0]])
    boxes = torch.tensor([[50.0, 80.0, 900.0, 1000.0]])
    ours = onnx(picture, points, labels, boxes)
    reference = dec.decode(model, picture, positions, points, labels, boxes)
    worst = 0.0
    for name in ("sam_masks", "hq_masks", "iou"):
        a, b = getattr(ours, name), getattr(reference, name)
        if (a is None) != (b is None):
            return float("inf")
        if a is not None:
            if a.shape != b.shape:
                return float("inf")
            worst = max(worst, float((a - b).abs().max()) / max(1.0, float(b.abs().max())))
    return worst


def time_side_by_side(
    onnx: OnnxDecoder, model, picture: dec.PictureFeatures, positions: torch.Tensor, rounds: int = 3
) -> tuple[float, float]:
    """Median seconds of a one-point decode with torch and with ONNX Runtime, interleaved after a warm-up."""
    points, labels = _synthetic_click()
    runs = {
        "torch": lambda: dec.decode(model, picture, positions, points, labels, None),
        "onnx": lambda: onnx(picture, points, labels, None),
    }
    for run in runs.values():
        run()
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            seconds[name].append(time.perf_counter() - start)
    return statistics.median(seconds["torch"]), statistics.median(seconds["onnx"])


def choose_decoder(
    setting: str, model, model_id: str, device: torch.device, dtype: torch.dtype, positions: torch.Tensor
) -> OnnxDecoder | None:
    """The ONNX Runtime decoder `setting` asks for, or None for torch. Logs one line saying which and why."""
    setting = parse_decoder(setting)
    if setting == "torch":
        return None
    if device.type != "cpu" or dtype != torch.float32:
        level = logging.WARNING if setting == "onnx" else logging.INFO
        log.log(
            level,
            "%s: decoder: torch on %s (%s): the ONNX graph runs in float32 on the CPU only",
            model_id,
            device,
            str(dtype).replace("torch.", ""),
        )
        return None
    try:
        onnx = OnnxDecoder(cached_server_graph(model, model_id))
        picture = synthetic_picture(model, positions)
        difference = matches_torch(onnx, model, picture, positions)
        if not difference <= LOAD_CHECK_TOLERANCE:
            raise RuntimeError(f"its masks differ from torch's by {difference:.2g} on a test prompt")
    except Exception as error:  # no runtime, no export tools, a failed export or a wrong answer: torch serves
        log.log(
            logging.WARNING if setting == "onnx" else logging.INFO,
            "%s: decoder: torch; ONNX Runtime is unavailable here (%s: %s)",
            model_id,
            type(error).__name__,
            error,
        )
        return None
    if setting == "onnx":
        log.info("%s: decoder: ONNX Runtime (SAMHQ_DECODER=onnx), graph %s", model_id, onnx.path.name)
        return onnx
    torch_s, onnx_s = time_side_by_side(onnx, model, picture, positions)
    faster = onnx_s < torch_s
    log.info(
        "%s: decoder: %s (a click's decode measured at load: torch %.1f ms, ONNX Runtime %.1f ms)",
        model_id,
        "ONNX Runtime" if faster else "torch",
        torch_s * 1000,
        onnx_s * 1000,
    )
    return onnx if faster else None


__all__ = ["DECODERS", "OnnxDecoder", "cached_server_graph", "choose_decoder", "graph_dir", "parse_decoder"]
