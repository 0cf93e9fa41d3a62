"""The model catalog, device/dtype choice, and loading through `from_pretrained`.

Loading goes through the ordinary Hugging Face path on purpose: a hub id is looked up in
the cache under `HF_HOME` (and downloaded when online), a folder is read as is.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from .errors import ModelUnavailableError, UnknownModelError

log = logging.getLogger(__name__)

Family = Literal["sam_hq", "sam"]


@dataclass(frozen=True)
class ModelSpec:
    """What the catalog knows of a supported checkpoint."""

    id: str
    family: Family
    encoder: str  # ViT-B / ViT-L / ViT-H
    parameters_m: int  # millions of parameters
    download_mb: int  # size of the safetensors weights

    @property
    def hq(self) -> bool:
        return self.family == "sam_hq"


DEFAULT_MODEL_ID = "syscv-community/sam-hq-vit-base"

CATALOG: dict[str, ModelSpec] = {
    spec.id: spec
    for spec in (
        ModelSpec("syscv-community/sam-hq-vit-base", "sam_hq", "ViT-B", 95, 380),
        ModelSpec("syscv-community/sam-hq-vit-large", "sam_hq", "ViT-L", 314, 1260),
        ModelSpec("syscv-community/sam-hq-vit-huge", "sam_hq", "ViT-H", 643, 2570),
        ModelSpec("facebook/sam-vit-base", "sam", "ViT-B", 94, 375),
        ModelSpec("facebook/sam-vit-large", "sam", "ViT-L", 312, 1250),
        ModelSpec("facebook/sam-vit-huge", "sam", "ViT-H", 641, 2560),
    )
}


def resolve_spec(name: str) -> ModelSpec:
    """The catalog entry for a hub id, or a spec read from a local checkpoint folder."""
    if name in CATALOG:
        return CATALOG[name]
    folder = Path(name).expanduser()
    if folder.is_dir():
        config_file = folder / "config.json"
        try:
            model_type = json.loads(config_file.read_text()).get("model_type", "")
        except (OSError, ValueError) as error:
            raise ModelUnavailableError(
                f"Model folder {str(folder)!r} has no readable config.json ({error}). "
                "Save a checkpoint there with `model.save_pretrained(folder)` and `processor.save_pretrained(folder)`.",
                param="model",
            ) from error
        if model_type not in ("sam_hq", "sam"):
            raise UnknownModelError(
                f"Model folder {str(folder)!r} holds a {model_type or 'unknown'!r} model; "
                "only SAM-HQ ('sam_hq') and SAM ('sam') checkpoints are supported.",
                param="model",
            )
        return ModelSpec(str(folder), model_type, "custom", 0, 0)
    known = ", ".join(CATALOG)
    raise UnknownModelError(
        f"Unknown model {name!r}. Supported models: {known}; or the path of a local folder "
        "holding a SAM-HQ or SAM checkpoint saved with save_pretrained.",
        param="model",
    )


def resolve_device(name: str = "auto"):
    """`auto` picks CUDA, then Apple MPS, then the CPU."""
    import torch

    name = (name or "auto").strip().lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise ValueError(f"Unknown device {name!r}: use auto, cpu, cuda, cuda:N or mps") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"Device {name!r} was asked for, but CUDA is not available on this machine")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"Device {name!r} was asked for, but Apple MPS is not available on this machine")
    return device


_DTYPES = {
    "float32": "float32",
    "fp32": "float32",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
}


def parse_dtype(name: str):
    """An explicit dtype by name; `auto` is decided by the engine (it checks mask agreement)."""
    import torch

    key = (name or "auto").strip().lower()
    if key == "auto":
        return None
    if key not in _DTYPES:
        raise ValueError(f"Unknown dtype {name!r}: use auto, float32, bfloat16 or float16")
    return getattr(torch, _DTYPES[key])


def cpu_quota(cgroup_root: str | Path = "/sys/fs/cgroup") -> int | None:
    """CPUs a container's cgroup quota grants (rounded up), or None when there is no quota.

    Containers (Spaces among them) often cap CPU time with a quota while the kernel still
    shows every core of the host; torch then starts a thread per host core.
    """
    root = Path(cgroup_root)
    try:
        if (root / "cpu.max").exists():  # cgroup v2: "QUOTA PERIOD" or "max PERIOD"
            quota, period = (root / "cpu.max").read_text().split()[:2]
            return None if quota == "max" else max(1, -(-int(quota) // int(period)))
        v1 = root / "cpu"
        if (v1 / "cpu.cfs_quota_us").exists():  # cgroup v1: -1 means no quota
            quota = int((v1 / "cpu.cfs_quota_us").read_text())
            period = int((v1 / "cpu.cfs_period_us").read_text())
            return None if quota <= 0 else max(1, -(-quota // period))
    except (OSError, ValueError):
        return None
    return None


def fit_cpu_threads(requested: int = 0, cgroup_root: str | Path = "/sys/fs/cgroup") -> int:
    """Set torch's CPU threads: `requested` if > 0, else no more than the usable cores (CPU
    affinity and cgroup quota). More threads than cores make every click slower (docs/PERFORMANCE.md).
    Returns the thread count in effect."""
    import torch

    if requested < 0:
        raise ValueError(f"SAMHQ_THREADS / --threads must be 0 (automatic) or a number of threads, got {requested}")
    if requested > 0:
        torch.set_num_threads(requested)
    else:
        usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        quota = cpu_quota(cgroup_root)
        usable = min(usable, quota) if quota else usable
        if torch.get_num_threads() > usable:
            log.info(
                "using %d CPU threads instead of %d: the cores this process may use", usable, torch.get_num_threads()
            )
            torch.set_num_threads(usable)
    return torch.get_num_threads()


def half_precision_candidate(device):
    """The reduced precision worth trying on this device, or None where float32 is the only sensible choice."""
    import torch

    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "mps":
        return torch.float16
    return None


@dataclass
class LoadedModel:
    """A model with its processor, where it runs and in which precision."""

    spec: ModelSpec
    model: Any  # SamHQModel | SamModel
    processor: Any  # SamHQProcessor | SamProcessor
    device: Any  # torch.device
    dtype: Any  # torch.dtype

    @property
    def id(self) -> str:
        return self.spec.id


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers a TCP connection within `timeout` s (False in offline mode)."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    url = urlsplit(constants.ENDPOINT)
    try:
        with socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout):
            return True
    except OSError:
        return False


def _how_to_provide(name: str) -> str:
    hf_home = os.environ.get("HF_HOME") or "~/.cache/huggingface"
    offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0", "false", "False")
    why = "Offline mode is on (HF_HUB_OFFLINE=1)" if offline else "The Hugging Face hub could not be reached"
    return (
        f"{why} and no copy was found in the cache under {hf_home}. "
        f"To provide it: run `hf download {name}` (huggingface_hub's command) on a machine with network and "
        "copy the cache, point HF_HOME at a populated cache (and set HF_HUB_OFFLINE=1 to skip the hub), "
        "or pass the path of a local folder saved with save_pretrained."
    )


def load_model(name: str, device: str = "cpu", dtype=None) -> LoadedModel:
    """Load model and processor with `from_pretrained`; errors say which model, why, and how to fix it."""
    import torch
    from transformers import AutoProcessor, SamHQModel, SamModel

    spec = resolve_spec(name)
    torch_device = resolve_device(device) if isinstance(device, str) else device
    torch_dtype = dtype or torch.float32
    model_class = SamHQModel if spec.family == "sam_hq" else SamModel
    # With the hub out of reach, huggingface_hub retries each file with back-off (~40 s) before it
    # looks in the cache: use the cache alone at once instead, so an offline first run fails fast.
    cache_only = not Path(name).expanduser().is_dir() and not hub_reachable()
    try:
        model = model_class.from_pretrained(name, dtype=torch_dtype, local_files_only=cache_only)
        processor = AutoProcessor.from_pretrained(name, local_files_only=cache_only)
    except OSError as error:
        is_local = Path(name).expanduser().is_dir()
        detail = (str(error).splitlines()[0] if str(error) else type(error).__name__).rstrip(". ")
        hint = (
            "The folder is missing files or they are corrupt; save the checkpoint again with save_pretrained."
            if is_local
            else _how_to_provide(name)
        )
        raise ModelUnavailableError(f"Model {name!r} could not be loaded: {detail}. {hint}", param="model") from error
    except Exception as error:  # safetensors, json and shape errors all mean "these files are broken"
        raise ModelUnavailableError(
            f"Model {name!r} could not be loaded: its files look corrupt or incompatible ({error}). "
            "Delete the cached copy and download it again, or save it anew with save_pretrained.",
            param="model",
        ) from error
    from .decoder import use_official_layer_norms
    from .encoder_memory import chunk_global_attention

    use_official_layer_norms(model)
    chunk_global_attention(model)  # bounds the encoder's peak memory (issue 11); same attention
    model.to(torch_device).eval()
    log.info("loaded %s on %s (%s)", name, torch_device, str(torch_dtype).replace("torch.", ""))
    return LoadedModel(spec=spec, model=model, processor=processor, device=torch_device, dtype=torch_dtype)
