"""Peak resident memory above idle for the largest requests the limits allow, over HTTP (issue 11).

    python benchmarks/peak_memory.py                          # ViT-B shape, CPU
    python benchmarks/peak_memory.py --max-work-mp 40000      # also 255 objects x 3 on 40 MP, composed

A ViT-B-shaped random checkpoint (the published architecture, meaningless masks) is served by
the real API (`install_api`) on a loopback uvicorn server in this process. Before each request
the kernel's peak-RSS mark is reset (`/proc/self/clear_refs`), so "peak above idle" is VmHWM after
the request minus VmRSS before it: the model, the cache and earlier requests are idle memory.
Each request uses a new picture, so the encoder runs. Linux only. Rerun it after changing the
decoder or the composition: it measures whatever the code does now.

    python benchmarks/peak_memory.py --page --shape tiny     # every page request on 40 MP pictures

`--page` serves the whole app (`app.build_app`: the page's `/ui` routes) and measures each page
request the same way: the upload of a 40-megapixel float TIFF (~250 KB), of a 40-megapixel photo-like
JPEG, the embedding, a click, and every download. The page's own work (decoding, previews, downloads)
does not depend on the checkpoint's shape; the embedding and the click do (see the API rows).
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


def float_tiff(width: int, height: int) -> bytes:
    """A 40-megapixel float32 TIFF that compresses to a few hundred KB (flat shapes, deflate)."""
    import numpy as np
    from PIL import Image

    values = np.zeros((height, width), dtype=np.float32)
    values[height // 5 : height // 2, width // 5 : width // 2] = 0.8
    values[height // 2 : height * 4 // 5, width // 2 : width * 4 // 5] = 0.3
    picture = Image.fromarray(values, "F")
    buffer = io.BytesIO()
    picture.save(buffer, format="TIFF", compression="tiff_adobe_deflate")
    return buffer.getvalue()


def photo_jpeg(width: int, height: int, seed: int) -> bytes:
    """A photo-like JPEG (noise over shapes: large downloads, as a real photo gives)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    small = rng.integers(0, 255, (height // 8, width // 8, 3), dtype=np.uint8)
    picture = Image.fromarray(small).resize((width, height), Image.Resampling.BILINEAR)
    buffer = io.BytesIO()
    picture.save(buffer, format="JPEG", quality=85)
    return buffer.getvalue()


def measure(label: str, rows: list, call, *args, **kwargs) -> object:
    gc.collect()
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")
    idle = _status("VmRSS")
    start = time.perf_counter()
    response = call(*args, **kwargs)
    seconds = time.perf_counter() - start
    peak = _status("VmHWM") - idle
    size = len(response.content)
    rows.append((label, response.status_code, seconds, peak, size))
    print(
        f"{label}: {response.status_code} in {seconds:.1f} s, {size / MiB:.1f} MiB, peak {peak / MiB:.0f} MiB above idle"
    )
    return response


def page(shape: str) -> None:
    """Every page request on 40-megapixel pictures, peak above idle (issue 21 row 5) and the session's disk."""
    import httpx
    from live_server import LiveServer

    import app as app_module
    from segmentation.offline import install_in_hf_cache
    from segmentation.settings import Settings

    install_in_hf_cache(_HF_HOME, MODEL_ID, "sam_hq", shape, seed=0, logit_gain=10000.0)
    application = app_module.build_app(Settings(model=MODEL_ID, device="cpu", preload_examples=False))
    store = application.state.page.store
    rows: list = []
    with LiveServer(application) as server, httpx.Client(base_url=server.url, timeout=3600) as client:
        for label, data in (
            ("40 MP float TIFF", float_tiff(8000, 5000)),
            ("40 MP photo JPEG", photo_jpeg(8000, 5000, 1)),
            ("20 MP photo JPEG", photo_jpeg(5472, 3648, 2)),
        ):
            sid = client.post("/ui/session").json()["session"]
            base = f"/ui/session/{sid}"
            print(f"{label}: {len(data) / 1e3:.0f} KB")
            measure(f"{label}: upload", rows, client.post, base + "/picture", content=data)
            measure(f"{label}: embedding", rows, client.post, base + "/op", json={"op": "embed"})
            click = {"op": "click", "x": 4000, "y": 1800}
            view = measure(f"{label}: click", rows, client.post, base + "/op", json=click).json()
            for name in ("snippet.py", "mask.png", "objects.json", "response.json", "cutout.png"):
                measure(f"{label}: {name}", rows, client.get, f"{base}/download/{view['rev']}/{name}")
            folder = store.get(sid).folder
            files = {p.name: p.stat().st_size for p in folder.rglob("*") if p.is_file()}
            print(f"{label}: session files {sum(files.values()) / MiB:.1f} MiB {files}")
            rows.append((f"{label}: session folder on disk", "", 0.0, 0, sum(files.values())))
            client.delete(base)
    print("\n| page request | answer | seconds | body | peak above idle |\n|---|---|---:|---:|---:|")
    for label, status, seconds, peak, size in rows:
        print(f"| {label} | {status} | {seconds:.1f} | {size / MiB:.1f} MiB | {peak / MiB:.0f} MiB |")
    shutil.rmtree(_HF_HOME, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="base", help="checkpoint shape (segmentation/offline.py)")
    parser.add_argument("--max-work-mp", type=int, default=None, help="SAMHQ_MAX_WORK_MP for this run")
    parser.add_argument("--objects", type=int, default=255, help="objects of the first request (default: the limit)")
    parser.add_argument("--page", action="store_true", help="the page's requests (upload, click, downloads)")
    args = parser.parse_args()
    if args.page:
        page(args.shape)
        return

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
