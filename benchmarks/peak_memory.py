"""Peak resident memory above idle for the largest requests the limits allow, over HTTP (issue 11).

    python benchmarks/peak_memory.py                          # ViT-B shape, CPU
    python benchmarks/peak_memory.py --max-work-mp 40000      # also 255 objects x 3 on 40 MP, composed

A ViT-B-shaped random checkpoint (the published architecture, meaningless masks) is served by
the real API (`install_api`) on a loopback uvicorn server in this process. Before each request
the kernel's peak-RSS mark is reset (`/proc/self/clear_refs`), so "peak above idle" is VmHWM after
the request minus VmRSS before it: the model, the cache and earlier requests are idle memory.
Each request uses a new picture, so the encoder runs. Linux only. Rerun it after changing the
decoder or the composition: it measures whatever the code does now.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

_HF_HOME = tempfile.mkdtemp(prefix="samhq-peak-hf-")
os.environ["HF_HOME"] = _HF_HOME
os.environ["HF_HUB_OFFLINE"] = "1"
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import base64  # noqa: E402
import gc  # noqa: E402
import io  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import time  # noqa: E402

MODEL_ID = "syscv-community/sam-hq-vit-base"
MiB = 2**20


def _status(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def picture_b64(width: int, height: int, seed: int) -> str:
    """A new picture each time (the encoder runs); flat shapes, so 40 megapixels fit in a small body."""
    from PIL import Image

    picture = Image.new("RGB", (width, height), (80 + seed, 100, 120))
    picture.paste((230, 30, 30), (width // 5, height // 5, width // 2, height // 2))
    picture.paste((20, 40, 220), (width // 2, height // 2, width * 4 // 5, height * 4 // 5))
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def one_point_objects(count: int, width: int, height: int) -> list:
    return [[[float((37 * i) % width), float((53 * i) % height)]] for i in range(count)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="base", help="checkpoint shape (segmentation/offline.py)")
    parser.add_argument("--max-work-mp", type=int, default=None, help="SAMHQ_MAX_WORK_MP for this run")
    parser.add_argument("--objects", type=int, default=255, help="objects of the first request (default: the limit)")
    args = parser.parse_args()

    import httpx
    import torch
    from fastapi import FastAPI
    from live_server import LiveServer

    from segmentation.api import install_api
    from segmentation.offline import install_in_hf_cache
    from segmentation.service import ModelRegistry
    from segmentation.settings import Settings

    install_in_hf_cache(_HF_HOME, MODEL_ID, "sam_hq", args.shape, seed=0, logit_gain=10000.0)
    overrides = {"max_work_mp": args.max_work_mp} if args.max_work_mp else {}
    settings = Settings(model=MODEL_ID, device="cpu", preload_examples=False, **overrides)
    registry = ModelRegistry(settings)
    app = FastAPI()
    install_api(app, registry, settings)
    at_limit = registry.limits.max_work_mp // (3 * 40)  # the most objects the work limit allows at 40 MP, n=3
    cases = [
        (
            f"{args.objects} one-point objects, n=3, 1 MP picture, size 8000x5000 (40 MP out)",
            1000,
            1000,
            args.objects,
            "8000x5000",
        ),
        (f"{at_limit} one-point objects, n=3, 40 MP picture (the work limit)", 8000, 5000, at_limit, None),
        ("255 one-point objects, n=3, 40 MP picture", 8000, 5000, 255, None),
    ]
    print(f"{platform.node()}: {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"checkpoint shape {args.shape}; limits {registry.limits}\n")
    rows = []
    with LiveServer(app) as server, httpx.Client(base_url=server.url, timeout=3600) as client:
        warm = {"model": MODEL_ID, "image_prompt": picture_b64(64, 48, 0), "segment_prompt": [[[5, 5]]]}
        assert client.post("/v1/images/segmentations", json=warm).status_code == 200  # model loaded: idle
        for seed, (name, width, height, objects, size) in enumerate(cases, start=1):
            body = {
                "model": MODEL_ID,
                "image_prompt": picture_b64(width, height, seed),
                "segment_prompt": one_point_objects(objects, width, height),
                "n": 3,
            }
            if size:
                body["size"] = size
            gc.collect()
            with open("/proc/self/clear_refs", "w") as clear:
                clear.write("5")  # peak RSS := current RSS
            idle = _status("VmRSS")
            start = time.perf_counter()
            response = client.post("/v1/images/segmentations", json=body)
            seconds = time.perf_counter() - start
            peak = _status("VmHWM") - idle
            outcome = str(response.status_code)
            if response.status_code != 200:
                outcome += " " + response.json()["error"]["code"]
            rows.append((name, outcome, seconds, peak, idle))
            print(f"{name}: {outcome} in {seconds:.1f} s, peak {peak / MiB:.0f} MiB above idle ({idle / MiB:.0f} MiB)")
    print("\n| request | answer | seconds | peak above idle |\n|---|---|---:|---:|")
    for name, outcome, seconds, peak, _ in rows:
        print(f"| {name} | {outcome} | {seconds:.1f} | {peak / MiB:.0f} MiB |")
    shutil.rmtree(_HF_HOME, ignore_errors=True)


if __name__ == "__main__":
    main()
