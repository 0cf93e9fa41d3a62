"""Test fixtures: a Hugging Face cache with small random-weight checkpoints under the real hub ids.

`huggingface_hub` reads HF_HOME when it is imported, so the cache is set up here, at import
time, before any test module imports transformers. Loading then goes through the real
`from_pretrained("syscv-community/sam-hq-vit-base")` path, offline.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

_HF_HOME = Path(tempfile.mkdtemp(prefix="samhq-test-hf-"))
os.environ["HF_HOME"] = str(_HF_HOME)
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("SAMHQ_PRELOAD_EXAMPLES", "0")
sys.path.insert(0, str(Path(__file__).parent))

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from segmentation.offline import install_in_hf_cache  # noqa: E402

HQ_ID = "syscv-community/sam-hq-vit-base"
SAM_ID = "facebook/sam-vit-base"
LOGIT_GAIN = 10000.0  # brings random-weight logits to order 1 (see offline.build_random_model)

install_in_hf_cache(_HF_HOME, HQ_ID, "sam_hq", "tiny", seed=0, logit_gain=LOGIT_GAIN)
install_in_hf_cache(_HF_HOME, SAM_ID, "sam", "tiny", seed=1, logit_gain=LOGIT_GAIN)


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_HF_HOME, ignore_errors=True)


@pytest.fixture(scope="session")
def hf_home() -> Path:
    return _HF_HOME


@pytest.fixture(scope="session")
def segmenter():
    from segmentation import Segmenter

    return Segmenter.from_pretrained(HQ_ID, device="cpu")


@pytest.fixture(scope="session")
def sam_segmenter():
    from segmentation import Segmenter

    return Segmenter.from_pretrained(SAM_ID, device="cpu")


def make_picture(width: int = 320, height: int = 200, seed: int = 0) -> np.ndarray:
    """A deterministic RGB picture: noisy background with a few solid shapes."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    picture = rng.integers(60, 120, size=(height, width, 3)).astype(np.uint8)
    picture[(x - width * 0.3) ** 2 + (y - height * 0.4) ** 2 < (min(width, height) * 0.2) ** 2] = (230, 30, 30)
    picture[(abs(x - width * 0.7) < width * 0.12) & (abs(y - height * 0.6) < height * 0.25)] = (20, 40, 220)
    return picture


@pytest.fixture
def picture() -> np.ndarray:
    return make_picture()


# ---- the vendor SDK (tests/test_sdk.py, tests/test_ray_serve.py) ----

SDK_PYTHONS = ["/root/.pyenv/versions/3.12.1/bin/python3", "python3.13", "python3.12"]


def _python312() -> str | None:
    for candidate in SDK_PYTHONS:
        path = shutil.which(candidate) or (candidate if Path(candidate).exists() else None)
        if path:
            version = subprocess.run(
                [path, "-c", "import sys; print(sys.version_info >= (3, 12))"], capture_output=True, text=True
            )
            if version.stdout.strip() == "True":
                return path
    return None


@pytest.fixture(scope="session")
def sdk_python(tmp_path_factory) -> str:
    """airefinery-sdk (Python >= 3.12) in a venv of its own, installed once per test run."""
    python = _python312()
    if python is None:
        pytest.skip("airefinery-sdk needs Python >= 3.12 and none is installed here")
    venv = tmp_path_factory.mktemp("sdk") / "venv"
    subprocess.run([python, "-m", "venv", str(venv)], check=True)
    install = subprocess.run(
        [str(venv / "bin" / "pip"), "install", "-q", "airefinery-sdk"], capture_output=True, text=True, timeout=900
    )
    if install.returncode != 0:
        pytest.skip(f"could not install airefinery-sdk (no package index?): {install.stderr[-500:]}")
    return str(venv / "bin" / "python")


# ---- the browser tests: Debian's Chromium driven by Playwright, never a downloaded browser build ----------
CHROMIUM = os.environ.get("CHROMIUM_PATH") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]


@pytest.fixture(scope="module")
def browser():
    playwright_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
    if not Path(CHROMIUM).exists():
        pytest.skip(f"Debian's chromium is not installed at {CHROMIUM} (apt-get install chromium)")
    with playwright_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield browser
        browser.close()
