"""Throughput of the Ray Serve application at 1, 4 and 16 concurrent clients, merged decodes on and off.

    python benchmarks/ray_throughput.py                          # ViT-B shape (random weights), 1 replica
    python benchmarks/ray_throughput.py --shape tiny --rounds 20

Starts a local Ray cluster (loopback) with one Segmenter replica using every core, and as many API (ingress)
replicas as needed to let 16 requests through at once (the router admits 4 segmentations per process). All
clients click on the same picture, one object of one point each, so their decodes can be merged; the
picture (assets/coffee.jpg, 1500x1000 JPEG) is encoded once before timing. Each client sends `rounds` clicks, waiting for each answer. Reports
clicks/s, mean latency and the replica's decoder calls per request (1.0 = nothing merged). Run by hand;
the figures go to docs/SCALING.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

_HF_HOME = tempfile.mkdtemp(prefix="samhq-raybench-hf-")
os.environ["HF_HOME"] = _HF_HOME  # before anything imports transformers
os.environ["HF_HUB_OFFLINE"] = "1"
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import base64  # noqa: E402
import io  # noqa: E402
import shutil  # noqa: E402
import socket  # noqa: E402
import statistics  # noqa: E402
from concurrent.futures import ThreadPoolExecutor  # noqa: E402

import httpx  # noqa: E402
from PIL import Image  # noqa: E402

MODEL_ID = "syscv-community/sam-hq-vit-base"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def picture_b64(width: int, height: int) -> str:
    """assets/coffee.jpg at the size asked, as a JPEG (as docs/PERFORMANCE.md's benchmark uses it)."""
    buffer = io.BytesIO()
    Image.open(ROOT / "assets" / "coffee.jpg").convert("RGB").resize((width, height)).save(buffer, format="JPEG")
    return base64.b64encode(buffer.getvalue()).decode()


def measure(url: str, image: str, clients: int, rounds: int, width: int, height: int) -> dict[str, float]:
    def client(worker: int) -> list[float]:
        latencies = []
        with httpx.Client(base_url=url, timeout=600) as http:
            for k in range(rounds):
                x, y = (37 * (worker * rounds + k)) % width, (23 * (worker * rounds + k)) % height
                body = {"model": MODEL_ID, "image_prompt": image, "segment_prompt": [[[x, y]]]}
                start = time.perf_counter()
                response = http.post("/v1/images/segmentations", json=body)
                latencies.append(time.perf_counter() - start)
                response.raise_for_status()
        return latencies

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        latencies = [value for result in pool.map(client, range(clients)) for value in result]
    elapsed = time.perf_counter() - start
    return {"clicks_per_s": len(latencies) / elapsed, "mean_ms": 1000 * statistics.fmean(latencies)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="base", choices=["tiny", "base-decoder", "base"])
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--rounds", type=int, default=8, help="clicks per client (default 8)")
    parser.add_argument("--cpus", type=float, default=float(os.cpu_count() or 1), help="CPUs of the replica")
    parser.add_argument("--merged", nargs="+", default=["off", "on"], choices=["off", "on"], help="modes, in order")
    parser.add_argument("--device", default="cpu", help="the replica's device: cpu, cuda (default cpu)")
    parser.add_argument("--gpus", type=float, default=0.0, help="GPUs of the replica (default 0)")
    parser.add_argument("--size", default="1500x1000", help="picture size WxH (default 1500x1000)")
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.split("x"))

    import ray
    from ray import serve

    from segmentation.offline import install_in_hf_cache
    from segmentation.serving.ray_app import build, runtime_env

    print(f"building a random {args.shape} SAM-HQ checkpoint in {_HF_HOME} ...", flush=True)
    install_in_hf_cache(_HF_HOME, MODEL_ID, "sam_hq", args.shape)
    env = {"SAMHQ_MODEL": MODEL_ID, "SAMHQ_DEVICE": args.device, "SAMHQ_PRELOAD_EXAMPLES": "0", "SAMHQ_MAX_QUEUE": "64"}
    ray.init(
        num_cpus=args.cpus,
        num_gpus=args.gpus,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        runtime_env=runtime_env(env),
    )
    image = picture_b64(width, height)
    rows = []
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        url = f"http://127.0.0.1:{port}"
        for batch in (mode == "on" for mode in args.merged):
            options = {
                "replicas": 1,
                "cpus": args.cpus,
                "gpus": args.gpus,
                "ingress_replicas": max(1, -(-max(args.clients) // 4)),
            }
            serve.run(build({**options, "batch": batch}), name="samhq", route_prefix="/")
            measure(url, image, 1, 1, width, height)  # encode the picture, warm the paths
            stats = serve.get_deployment_handle("Segmenter", "samhq").stats
            for clients in args.clients:
                before = stats.remote().result()
                result = measure(url, image, clients, args.rounds, width, height)
                after = stats.remote().result()
                requests = after["decoded_requests"] - before["decoded_requests"]
                calls = after["decoder_calls"] - before["decoder_calls"]
                result["calls_per_request"] = calls / requests if requests else 1.0
                rows.append((batch, clients, result))
                print(f"batch={batch} clients={clients}: {result}", flush=True)
            serve.delete("samhq")
    finally:
        serve.shutdown()
        ray.shutdown()
        shutil.rmtree(_HF_HOME, ignore_errors=True)

    print(
        f"\n{args.shape} shape, picture {width}x{height}, 1 replica with {args.cpus:g} CPUs, {args.rounds} clicks per client"
    )
    print("| merged decodes | clients | clicks/s | mean latency | decoder calls per request |")
    print("|---|---:|---:|---:|---:|")
    for batch, clients, r in rows:
        calls = f"{r['calls_per_request']:.2f}" if batch else "1 (each alone)"
        print(f"| {'on' if batch else 'off'} | {clients} | {r['clicks_per_s']:.2f} | {r['mean_ms']:.0f} ms | {calls} |")


if __name__ == "__main__":
    main()
