"""A warm click over HTTP with the decoder on torch and on ONNX Runtime, side by side in one run.

    python benchmarks/onnx_bench.py                   # ViT-B shape (random weights), 1500x1000 picture, CPU
    python benchmarks/onnx_bench.py --reps 30 --threads 1

Two live servers in this process share one loaded model (each registry keeps its own embedding cache); one decodes with torch,
the other with ONNX Runtime (`Segmenter.use_decoder("onnx")`, graph exported on first use). Each rep
sends the same warm click (the API's real request path: JSON body with the picture, cached embedding,
PNG label map back) to both, in alternating blocks of 5 (`interleaved`). Then the decoder alone, in process, the same
way. Medians, p95 and the ratio go to stdout and benchmarks/results/onnx_bench.json.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # live_server

# bench sets HF_HOME (a temporary cache) and offline mode before transformers is imported
from benchmarks.bench import _HF_HOME, MODEL_ID, ONE_OBJECT, ROOT, load_picture, summary  # noqa: E402

URL = "/v1/images/segmentations"


def serve(segmenter):
    from fastapi import FastAPI

    from segmentation.api import install_api
    from segmentation.service import ModelRegistry
    from segmentation.settings import Settings

    settings = Settings(model=segmenter.model_id, preload_examples=False, device="cpu")
    registry = ModelRegistry(settings, loader=lambda *a, **k: segmenter)
    app = FastAPI()
    install_api(app, registry, settings)
    return app


def interleaved(runs: dict, reps: int, block: int = 5) -> dict[str, list[float]]:
    """Seconds per rep of each callable, measured in alternating blocks of `block` runs (the first run of a
    block is a warm-up, not counted), so load drifts hit both alike while neither backend's thread pool (torch's
    OpenMP threads wind down by spinning) runs inside the other's measurements: a server uses one backend."""
    names = list(runs)
    seconds: dict[str, list[float]] = {name: [] for name in names}
    turn = 0
    while min(len(v) for v in seconds.values()) < reps:
        for name in names if turn % 2 == 0 else names[::-1]:
            runs[name]()  # warm-up after the other backend's block
            for _ in range(block):
                start = time.perf_counter()
                runs[name]()
                seconds[name].append(time.perf_counter() - start)
        turn += 1
    return {name: values[:reps] for name, values in seconds.items()}


def report(title: str, seconds: dict[str, list[float]]) -> dict:
    stats = {name: summary(values) for name, values in seconds.items()}
    ratio = stats["torch"]["median_ms"] / stats["onnx"]["median_ms"]
    print(f"\n{title}")
    for name, s in stats.items():
        print(f"  {name:6s} median {s['median_ms']:8.1f} ms   p95 {s['p95_ms']:8.1f} ms   n={s['n']}")
    print(f"  ONNX Runtime is {ratio:.2f}x torch's speed (median over median)")
    return {"stats": stats, "speedup": ratio}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="base", choices=["tiny", "base"])
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=0, help="CPU threads for both (0: the usable cores)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args()

    import httpx
    import torch
    from live_server import LiveServer

    from segmentation import Segmenter
    from segmentation.models import fit_cpu_threads
    from segmentation.offline import install_in_hf_cache

    threads = fit_cpu_threads(args.threads)
    install_in_hf_cache(Path(_HF_HOME), MODEL_ID, "sam_hq", args.shape)
    torch_seg = Segmenter.from_pretrained(MODEL_ID, device="cpu", decoder="torch")
    onnx_seg = Segmenter(torch_seg.loaded, torch_seg.cache, torch_seg.max_pixels)
    start = time.perf_counter()
    if onnx_seg.use_decoder("onnx") != "onnx":
        raise SystemExit("ONNX Runtime is not available here (see the log line above)")
    load_s = time.perf_counter() - start
    picture = load_picture(None)  # bench.py's 1500x1000 photo
    body = {"model": MODEL_ID, "image_prompt": base64.b64encode(picture).decode(), "segment_prompt": ONE_OBJECT}
    print(f"{MODEL_ID} ({args.shape} shape, random weights), CPU threads {threads}, load avg {os.getloadavg()}")
    print(f"ONNX graph exported or found and checked in {load_s:.1f} s: {onnx_seg.onnx_decoder.path.name}")

    with (
        LiveServer(serve(torch_seg)) as torch_server,
        LiveServer(serve(onnx_seg)) as onnx_server,
        httpx.Client(timeout=600) as client,
    ):

        def click(server) -> None:
            response = client.post(server.url + URL, json=body)
            response.raise_for_status()
            assert response.json()["usage"]["input_tokens_details"]["cached_tokens"] > 0

        for server in (torch_server, onnx_server):  # each registry has its own embedding cache
            client.post(server.url + URL, json=body).raise_for_status()  # embeds the picture
            click(server)  # first-call overheads out of the measurements
        http = interleaved({"torch": lambda: click(torch_server), "onnx": lambda: click(onnx_server)}, args.reps)

    embedding = torch_seg.embed(picture)
    decoder = interleaved(
        {
            "torch": lambda: torch_seg.decode(embedding, ONE_OBJECT),
            "onnx": lambda: onnx_seg.decode(embedding, ONE_OBJECT),
        },
        args.reps,
    )
    results = {
        "model": f"{MODEL_ID} ({args.shape} shape, random weights)",
        "torch": torch.__version__,
        "onnxruntime": __import__("onnxruntime").__version__,
        "threads": threads,
        "load_average_at_end": os.getloadavg(),
        "warm_click_http": report("warm click over HTTP (POST /v1/images/segmentations, one point)", http),
        "decoder_only": report("decoder alone (Segmenter.decode, one point)", decoder),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "onnx_bench.json").write_text(json.dumps(results, indent=2))
    print(f"\nload average at the end: {results['load_average_at_end']}; written to {out / 'onnx_bench.json'}")


if __name__ == "__main__":
    main()
