"""What the browser benchmarks share: Debian's Chromium and its flags, the test picture, a median.

No side effects on import (the benchmarks set HF_HOME themselves before transformers is imported)."""

from __future__ import annotations

import io
import os
import shutil
import statistics
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = os.environ.get("CHROMIUM_PATH") or shutil.which("chromium") or "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run"]


def picture(width: int, height: int) -> bytes:
    """The project's photo (assets/coffee.jpg) at width × height, as a JPEG."""
    image = Image.open(ROOT / "assets" / "coffee.jpg").convert("RGB").resize((width, height))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")
