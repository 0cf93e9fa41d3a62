"""The page tier alone: `app.py --backend URL` installed from requirements-page.txt into a fresh virtual environment
(no torch, no transformers), started as a process in front of a live API server, and clicked through over HTTP as
the browser does.

The fresh environment needs the package index (as CI has); the test skips, saying so, only when pip cannot reach
it. Cost measured here: pip 90 s alone on 2 cores (wheels from pip's cache, ~370 MB under the test's temporary
folder, removed with it), the page ready 15 s after its start, the in-place import check 30 s: about 2 minutes
(6 minutes with the machine's load average at 11-20).
"""

from __future__ import annotations

import base64
import io
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from conftest import HQ_ID, make_picture
from live_server import LiveServer, free_port
from PIL import Image

import app
from segmentation.settings import Settings

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
UNREACHABLE = re.compile(
    r"NewConnectionError|Temporary failure in name resolution|Name or service not known|Network is unreachable|"
    r"ProxyError|ConnectTimeout|Max retries exceeded|Connection refused|Read timed out",
)
NO_TORCH_CHECK = """
import sys
import app
from segmentation.settings import Settings
app.build_app(Settings(model="m", preload_examples=False), backend_url=sys.argv[1])
engine = ("segmentation.engine", "segmentation.decoder", "ui.backend")
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers") or m in engine)
print("LOADED", loaded)
"""


@pytest.fixture(scope="module")
def page_python(tmp_path_factory) -> str:
    """A fresh venv with requirements-page.txt only (pip's cache is read as usual; nothing else is kept)."""
    venv = tmp_path_factory.mktemp("page") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = str(venv / "bin" / "python")
    install = subprocess.run(
        # --no-compile: Python compiles what the page imports when it first imports it; pip would compile every
        # module of every package, which proves nothing about the page
        [python, "-m", "pip", "install", "-q", "--no-compile", "-r", str(ROOT / "requirements-page.txt")],
        capture_output=True,
        text=True,
        timeout=900,
    )
    if install.returncode != 0:
        if UNREACHABLE.search(install.stderr):
            pytest.skip(f"pip cannot reach the package index: {install.stderr.strip().splitlines()[-1][-300:]}")
        pytest.fail(f"pip install -r requirements-page.txt failed:\n{install.stderr[-3000:]}")
    return python


def png_bytes(seed=9) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(make_picture(240, 160, seed=seed)).save(buffer, "PNG")
    return buffer.getvalue()


def op(client: httpx.Client, sid: str, **body) -> dict:
    response = client.post(f"/ui/session/{sid}/op", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def test_the_page_imports_no_torch_in_this_environment_either():
    """Here torch is installed: the page's process must still not import it (nor the engine, nor transformers)."""
    done = subprocess.run(
        [sys.executable, "-c", NO_TORCH_CHECK, f"http://127.0.0.1:{free_port()}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "LOADED []" in done.stdout, done.stdout[-2000:]


def test_the_page_tier_installs_without_torch_starts_and_segments_through_a_live_api(page_python, tmp_path):
    for module in ("torch", "transformers"):
        absent = subprocess.run([page_python, "-c", f"import {module}"], capture_output=True, timeout=120)
        assert absent.returncode != 0, f"requirements-page.txt pulled in {module}"
    backend = app.build_app(Settings(model=HQ_ID, preload_examples=False, device="cpu"))
    backend.state.registry.get()
    port = free_port()
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env["GRADIO_ANALYTICS_ENABLED"] = "False"
    log = tmp_path / "page.log"
    picture = png_bytes()
    with LiveServer(backend) as api, log.open("w") as out:
        started = time.monotonic()
        page = subprocess.Popen(
            [page_python, "app.py", "--backend", api.url, "--host", "127.0.0.1", "--port", str(port)],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        try:
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as client:
                deadline = time.monotonic() + 180
                while True:
                    assert page.poll() is None, f"the page exited:\n{log.read_text()[-3000:]}"
                    try:
                        config = client.post("/ui/session")
                        break
                    except httpx.TransportError:
                        assert time.monotonic() < deadline, f"the page did not start:\n{log.read_text()[-3000:]}"
                        time.sleep(0.25)
                ready_in = time.monotonic() - started
                assert config.status_code == 200, config.text
                config = config.json()
                assert config["models"] == [HQ_ID] and config["banner"] is None
                sid = config["session"]
                assert client.get("/").status_code == 200, "the Gradio page itself"
                assert client.post(f"/ui/session/{sid}/picture", content=picture).status_code == 200
                assert op(client, sid, op="embed")["picture"]["embedded"]
                view = op(client, sid, op="click", x=100, y=80, include=True)
                assert view["map"] and len(view["thumbnails"]) == 3
                op(client, sid, op="new")
                view = op(client, sid, op="click", x=200, y=120, include=True)
                view = op(client, sid, op="click", x=190, y=30, include=False)
                mask = client.get(f"/ui/session/{sid}/download/{view['rev']}/mask.png")
                assert mask.status_code == 200, mask.text
                objects = client.get(f"/ui/session/{sid}/download/{view['rev']}/objects.json").json()["objects"]
            direct = httpx.post(
                api.url + "/v1/images/segmentations",
                json={
                    "model": HQ_ID,
                    "image_prompt": base64.b64encode(picture).decode(),
                    "segment_prompt": [o["points"] for o in objects],
                    "point_labels": [o["labels"] for o in objects],
                },
                timeout=120,
            ).json()
            assert base64.b64decode(direct["data"][0]["b64_json"]) == mask.content, "the API's bytes, through the page"
        finally:
            page.terminate()
            page.wait(timeout=60)
    output = log.read_text()
    assert "Traceback" not in output, output[-3000:]
    print(f"page without torch: ready {ready_in:.1f} s after its start")
