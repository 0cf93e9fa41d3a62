"""Test fixtures: a Hugging Face cache with small random-weight checkpoints under the real hub ids.

`huggingface_hub` reads HF_HOME when it is imported, so the cache's place is set here, at import
time, before any test module imports transformers. Loading then goes through the real
`from_pretrained("syscv-community/sam-hq-vit-base")` path, offline.

Parallel runs (`pytest -n auto`, pytest-xdist): the controller picks the cache's folder and its workers
inherit it (an environment variable); the first worker builds the checkpoints under a file lock, the others
find them built. Things that cost minutes to make (the SDK's venv) are shared the same way. Each worker runs
torch on its share of the cores, so that 2 workers on 2 cores do not fight over them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

_SHARED_HF_HOME = "SAMHQ_TESTS_HF_HOME"  # set by the first process of a run (the xdist controller) for its workers
_OWNER = _SHARED_HF_HOME not in os.environ
_HF_HOME = Path(os.environ.get(_SHARED_HF_HOME) or tempfile.mkdtemp(prefix="samhq-test-hf-"))
os.environ[_SHARED_HF_HOME] = str(_HF_HOME)
os.environ["HF_HOME"] = str(_HF_HOME)
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("SAMHQ_PRELOAD_EXAMPLES", "0")
# Servers read SAMHQ_DECODER from the environment (default auto: measure, maybe export an ONNX graph per worker);
# tests compare label maps with torch exactly, so they run torch unless a test asks for ONNX itself.
os.environ.setdefault("SAMHQ_DECODER", "torch")
sys.path.insert(0, str(Path(__file__).parent))

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from filelock import FileLock  # noqa: E402

HQ_ID = "syscv-community/sam-hq-vit-base"
SAM_ID = "facebook/sam-vit-base"
LOGIT_GAIN = 10000.0  # brings random-weight logits to order 1 (see offline.build_random_model)
MAX_AUTO_WORKERS = 4  # `-n auto` on a big machine: more workers than this only add start-up cost and memory


def _xdist_controller(config) -> bool:
    """This process hands the tests out to xdist workers and runs none itself."""
    return bool(getattr(config.option, "tx", None)) and config.getoption("dist", "no") != "no"


def usable_cores() -> int:
    """The cores this process may use (CPU affinity and cgroup quota), as the app counts them."""
    from segmentation.models import cpu_quota

    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = cpu_quota("/sys/fs/cgroup")
    return max(1, min(usable, quota) if quota else usable)


def pytest_xdist_auto_num_workers(config) -> int:
    """`-n auto`: one worker per usable core (xdist alone counts the host's cores, ignoring a cgroup quota)."""
    if os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS"):
        return int(os.environ["PYTEST_XDIST_AUTO_NUM_WORKERS"])
    return min(usable_cores(), MAX_AUTO_WORKERS)


def pytest_configure(config):
    if _xdist_controller(config):
        return  # the workers build the checkpoints; the controller imports no torch at all
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        import torch

        torch.set_num_threads(max(1, usable_cores() // workers))
    with FileLock(str(_HF_HOME) + ".lock"):
        if not (_HF_HOME / ".built").exists():
            from segmentation.offline import install_in_hf_cache

            install_in_hf_cache(_HF_HOME, HQ_ID, "sam_hq", "tiny", seed=0, logit_gain=LOGIT_GAIN)
            install_in_hf_cache(_HF_HOME, SAM_ID, "sam", "tiny", seed=1, logit_gain=LOGIT_GAIN)
            (_HF_HOME / ".built").touch()


def pytest_sessionfinish(session, exitstatus):
    if _OWNER:  # the controller (or a run without workers) ends after its workers
        shutil.rmtree(_HF_HOME, ignore_errors=True)
        Path(str(_HF_HOME) + ".lock").unlink(missing_ok=True)


# Modules that take minutes, longest first: under xdist each module goes whole to one worker
# (`--dist loadfile`) in this order, so the long ones start at once instead of ending the run alone.
LONGEST_FIRST = ("test_ray_serve.py", "test_page_without_torch.py")


def pytest_collection_modifyitems(session, config, items):
    """Long modules first: those named above, then any module with a `slow` or `browser` test, then the rest
    (each in its own order; a module's tests keep theirs)."""
    heavy = {item.path for item in items if item.get_closest_marker("slow") or item.get_closest_marker("browser")}

    def rank(item) -> tuple[int, int]:
        if item.path.name in LONGEST_FIRST:
            return (0, LONGEST_FIRST.index(item.path.name))
        return (1, 0) if item.path in heavy else (2, 0)

    items.sort(key=rank)  # stable: the order within a module (and among equals) stays
    seen: set[str] = set()
    shared = sorted({item.nodeid for item in items if item.nodeid in seen or seen.add(item.nodeid)})
    if shared:  # pytest-xdist schedules by node id: all but one test of a shared id would silently not run
        raise pytest.UsageError(f"tests share a node id (give each its own): {', '.join(shared[:5])}")


def shared_folder(tmp_path_factory) -> Path:
    """A folder every worker of this run sees (the parent of the workers' own temporary folders)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


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
    """airefinery-sdk (Python >= 3.12) in a venv of its own, installed once per test run (xdist workers
    share it: the first one to need it installs it under a lock, the others wait and reuse it)."""
    python = _python312()
    if python is None:
        pytest.skip("airefinery-sdk needs Python >= 3.12 and none is installed here")
    shared = shared_folder(tmp_path_factory)
    venv, failed = shared / "sdk" / "venv", shared / "sdk" / "install-failed.txt"
    with FileLock(str(shared / "sdk.lock")):
        if failed.exists():
            pytest.skip(failed.read_text())
        if not (venv / "installed").exists():
            shutil.rmtree(venv, ignore_errors=True)  # what a worker that died mid-install left
            subprocess.run([python, "-m", "venv", str(venv)], check=True)
            install = subprocess.run(
                [str(venv / "bin" / "pip"), "install", "-q", "airefinery-sdk"],
                capture_output=True,
                text=True,
                timeout=900,
            )
            if install.returncode != 0:
                failed.write_text(f"could not install airefinery-sdk (no package index?): {install.stderr[-500:]}")
                pytest.skip(failed.read_text())
            (venv / "installed").touch()
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
