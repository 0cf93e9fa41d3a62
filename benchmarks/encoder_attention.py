"""Time and peak memory of one image encode, transformers' attention vs global attention in head chunks.

    python benchmarks/encoder_attention.py                    # ViT-B shape, chunks 1 2 3 4 6, 3 rounds
    python benchmarks/encoder_attention.py --chunks 2 --rounds 5

A ViT-B-shaped random checkpoint (segmentation/offline.py) encodes one 1024x1024 input. The
settings run round-robin (each round runs every setting once), so a shared machine's load falls on
all of them alike; the time is the median over rounds. Peak = VmHWM after an encode minus VmRSS
before it, the kernel's mark reset first (`/proc/self/clear_refs`). Linux only.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

MiB = 2**20


def _status(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="base")
    parser.add_argument("--family", default="sam_hq")
    parser.add_argument("--chunks", type=int, nargs="*", default=[1, 2, 3, 4, 6])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    import torch

    from segmentation.encoder_memory import _chunked_forward
    from segmentation.offline import build_random_model

    model = build_random_model(args.family, args.shape, seed=0)
    pixels = torch.randn(1, 3, 1024, 1024)
    global_attention = [layer.attn for layer in model.vision_encoder.layers if layer.window_size == 0]

    def configure(heads: int | None) -> None:
        for attention in global_attention:
            attention.__dict__.pop("forward", None)
            if heads:
                attention.heads_per_chunk = heads
                attention.forward = _chunked_forward.__get__(attention)

    settings: list[int | None] = [None, *args.chunks]
    times: dict = {setting: [] for setting in settings}
    peaks: dict = {setting: [] for setting in settings}
    threads = torch.get_num_threads()
    print(f"{os.cpu_count()} cores, torch {torch.__version__}, {threads} threads, {args.shape}", flush=True)
    with torch.inference_mode():
        model.vision_encoder(pixel_values=pixels)  # warm-up
        for _ in range(args.rounds):
            for setting in settings:
                configure(setting)
                gc.collect()
                with open("/proc/self/clear_refs", "w") as clear:
                    clear.write("5")
                idle = _status("VmRSS")
                start = time.perf_counter()
                model.vision_encoder(pixel_values=pixels)
                times[setting].append(time.perf_counter() - start)
                peaks[setting].append(_status("VmHWM") - idle)
                print(
                    f"  {setting or 'all'} heads: {times[setting][-1]:.2f} s, {peaks[setting][-1] / MiB:.0f} MiB",
                    flush=True,
                )
    print("\n| global attention | encode (median s) | peak above idle (max) |\n|---|---:|---:|")
    for setting in settings:
        name = "all heads at once (transformers)" if setting is None else f"{setting} heads at a time"
        print(f"| {name} | {statistics.median(times[setting]):.2f} | {max(peaks[setting]) / MiB:.0f} MiB |")


if __name__ == "__main__":
    main()
