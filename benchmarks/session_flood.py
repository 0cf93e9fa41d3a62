"""Issue 21 row 3: what a stranger's flood of edits on their own session costs everybody else.

    python benchmarks/session_flood.py                 # ViT-B-shaped random checkpoint, `python app.py`
    python benchmarks/session_flood.py --shape tiny    # quick

Starts `python app.py` (the real entry point: uvicorn, its flags) on a loopback port with a random-weight
checkpoint in a temporary Hugging Face cache. The stranger opens a session, loads a picture and makes
16 objects; then sends 80 edits of ~50 bytes on 80 connections and hangs up on each at once. Measured
idle first, then right after the flood: `GET /v1/models`, a click through the API on an embedded
picture, a static example thumbnail, and another visitor's upload (open + picture + embed, a new
picture each time so the encoder runs both times). Also how many of the 80 hung-up edits ran.
"""

from __future__ import annotations

import argparse
import io
import os
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
MODEL_ID = "syscv-community/sam-hq-vit-base"


def picture_png(seed: int, width: int = 640, height: int = 480) -> bytes:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    pixels = rng.integers(60, 120, (height, width, 3), dtype=np.uint8)
    pixels[height // 4 : height // 2, width // 4 : width // 2] = (230, 30, 30)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="base", help="checkpoint shape (segmentation/offline.py)")
    parser.add_argument("--edits", type=int, default=80)
    args = parser.parse_args()

    import base64

    import httpx
    from live_server import free_port

    from segmentation.offline import install_in_hf_cache

    hf_home = tempfile.mkdtemp(prefix="samhq-flood-hf-")
    install_in_hf_cache(hf_home, MODEL_ID, "sam_hq", args.shape, seed=0, logit_gain=10000.0)
    port = free_port()
    env = dict(os.environ, HF_HOME=hf_home, HF_HUB_OFFLINE="1", SAMHQ_THREADS=os.environ.get("SAMHQ_THREADS", "0"))
    server = subprocess.Popen(
        [sys.executable, "app.py", "--port", str(port), "--no-preload"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=url, timeout=600) as http:
            deadline = time.monotonic() + 120
            while True:
                try:
                    if http.get("/v1/models").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline or server.poll() is not None:
                    raise SystemExit("the server did not start")
                time.sleep(0.2)
            api_picture = base64.b64encode(picture_png(1)).decode()
            api_body = {"model": MODEL_ID, "image_prompt": api_picture, "segment_prompt": [[[100, 100]]]}
            assert http.post("/v1/images/segmentations", json=api_body).status_code == 200  # model loaded, embedded

            def visitor_upload(seed: int) -> None:
                sid = http.post("/ui/session").json()["session"]
                assert http.post(f"/ui/session/{sid}/picture", content=picture_png(seed)).status_code == 200
                assert http.post(f"/ui/session/{sid}/op", json={"op": "embed"}).status_code == 200
                http.delete(f"/ui/session/{sid}")

            def timed(fn) -> float:
                start = time.perf_counter()
                fn()
                return time.perf_counter() - start

            probes = {
                "GET /v1/models": lambda: http.get("/v1/models").raise_for_status(),
                "API click (embedded picture)": lambda: http.post(
                    "/v1/images/segmentations", json=api_body
                ).raise_for_status(),
                "example thumbnail": lambda: http.get("/ui/examples/0.jpg").raise_for_status(),
            }
            stranger = http.post("/ui/session").json()["session"]
            assert http.post(f"/ui/session/{stranger}/picture", content=picture_png(2)).status_code == 200
            http.post(f"/ui/session/{stranger}/op", json={"op": "embed"}).raise_for_status()
            for i in range(16):
                http.post(f"/ui/session/{stranger}/op", json={"op": "click", "x": 20 + 35 * i, "y": 240})
                http.post(f"/ui/session/{stranger}/op", json={"op": "new"})
            view = http.post(f"/ui/session/{stranger}/op", json={"op": "select", "number": 1}).json()
            points = sum(len(o["points"]) for o in view["objects"])
            idle = {name: timed(fn) for name, fn in probes.items()}
            idle["another visitor's upload"] = timed(lambda: visitor_upload(3))
            idle_edit = timed(
                lambda: http.post(
                    f"/ui/session/{stranger}/op", json={"op": "click", "x": 30, "y": 30, "include": True}
                ).raise_for_status()
            )

            edit = b'{"op": "click", "x": 30, "y": 30, "include": true}'
            request = (
                f"POST /ui/session/{stranger}/op HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(edit)}\r\n\r\n"
            ).encode() + edit

            def hang_up(_: int) -> None:
                with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                    sock.sendall(request)

            with ThreadPoolExecutor(16) as pool:
                list(pool.map(hang_up, range(args.edits)))
            flooded = {name: timed(fn) for name, fn in probes.items()}
            flooded["another visitor's upload"] = timed(lambda: visitor_upload(4))
            deadline = time.monotonic() + 600
            while (
                answer := http.post(f"/ui/session/{stranger}/op", json={"op": "select", "number": 1})
            ).status_code == 429:
                if time.monotonic() > deadline:
                    break
                time.sleep(0.05)
            ran = sum(len(o["points"]) for o in answer.json()["objects"]) - points - 1
    finally:
        server.terminate()
        server.wait(timeout=30)
    print(f"checkpoint shape {args.shape}; one edit on the stranger's 16-object session: {idle_edit:.2f} s idle")
    print(f"{args.edits} edits sent and hung up at once; of them ran: {ran}\n")
    print("| request | idle, s | right after the flood, s |\n|---|---:|---:|")
    for name in idle:
        print(f"| {name} | {idle[name]:.2f} | {flooded[name]:.2f} |")


if __name__ == "__main__":
    main()
