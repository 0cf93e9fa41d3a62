"""The prompt decoder on ONNX Runtime (SAMHQ_DECODER=onnx) against the torch decode and the official code.

Every prompt shape must give the torch decode's logits (within 1e-4 of their size) and scores, and the
same label maps. Label maps are compared with tests/agreement.py: equal wherever the torch decode's
decision is farther than a rounding band from changing, since two float32 paths (here torch's kernels
and ONNX Runtime's, ~1e-6 apart) may put a pixel whose logit is within that noise of zero on either side.
The graphs are exported once per session (cached under the session's HF_HOME, as a server caches them).
"""

from __future__ import annotations

import logging
import sys

import numpy as np
import pytest
from agreement import assert_labels_agree, label_map_margins
from conftest import HQ_ID, make_picture
from test_official import OBJECTS as OFFICIAL_OBJECTS
from test_official import _check_against_official

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from segmentation import onnx_decoder  # noqa: E402
from segmentation.engine import Segmenter  # noqa: E402

TOLERANCE = 1e-4  # logits and scores, relative to their size (the test checkpoints' are of order 1-10)

# (points, labels, box) per object in picture pixels: 1 point, several points with include and exclude,
# an exclude point alone, box alone, box + 1 point, box + points, and two objects of one layout (a batch).
OBJECTS = [
    ([[60, 70]], [1], None),
    ([[100, 80], [130, 95], [20, 150]], [1, 1, 0], None),
    ([[200, 40]], [0], None),
    ([], [], [30, 40, 200, 150]),
    ([[70, 75]], [1], [10, 10, 300, 190]),
    ([[0, 0], [250, 60]], [1, 0], [0, 0, 320, 200]),
    ([[300, 180]], [1], None),
]


def _twin(segmenter: Segmenter, decoder: str) -> Segmenter:
    """The same loaded model and embedding cache with another decoder backend."""
    twin = Segmenter(segmenter.loaded, segmenter.cache, segmenter.max_pixels)
    assert twin.use_decoder(decoder) == decoder
    return twin


@pytest.fixture(scope="module")
def onnx_segmenter(segmenter):
    return _twin(segmenter, "onnx")


@pytest.fixture(scope="module")
def onnx_sam_segmenter(sam_segmenter):
    return _twin(sam_segmenter, "onnx")


def _assert_same_decode(torch_seg: Segmenter, onnx_seg: Segmenter, objects, hq_token_only: bool) -> None:
    embedding = torch_seg.embed(make_picture(320, 200, seed=5))
    prompt = torch_seg.parse(embedding, [o[0] for o in objects], [o[1] for o in objects], [o[2] for o in objects])
    expected = torch_seg.decode(embedding, prompt, hq_token_only=hq_token_only)
    decoded = onnx_seg.decode(embedding, prompt, hq_token_only=hq_token_only)
    assert decoded.counts == expected.counts
    scale = max(1.0, float(expected.logits.abs().max()))
    assert float(expected.logits.abs().max()) > 0.1, "logits too small for the comparison to mean anything"
    difference = float((decoded.logits - expected.logits).abs().max())
    assert difference <= TOLERANCE * scale
    np.testing.assert_allclose(decoded.scores, expected.scores, rtol=TOLERANCE, atol=TOLERANCE)
    # A decision (best logit vs 0, best vs second best) moves by at most twice the logits' largest difference
    # (upscaling interpolates, so it adds none): only pixels within that band of changing may differ.
    band = 2 * difference + 1e-7
    candidates = 3
    ours = onnx_seg.compose(embedding, decoded, candidates=candidates)
    theirs = torch_seg.compose(embedding, expected, candidates=candidates)
    for mine, reference, margin in zip(
        ours.candidates, theirs.candidates, label_map_margins(embedding, expected, candidates), strict=True
    ):
        assert_labels_agree(mine.labels, reference.labels, margin, band)


@pytest.mark.parametrize("hq_token_only", [False, True])
def test_every_prompt_shape_decodes_as_torch_does(segmenter, onnx_segmenter, hq_token_only):
    _assert_same_decode(segmenter, onnx_segmenter, OBJECTS, hq_token_only)


def test_sam_without_the_hq_token_decodes_as_torch_does(sam_segmenter, onnx_sam_segmenter):
    assert not onnx_sam_segmenter.onnx_decoder.hq
    _assert_same_decode(sam_segmenter, onnx_sam_segmenter, OBJECTS[:5], False)


def test_official_reference_with_onnx_on(onnx_segmenter):
    """tests/test_official.py's mixed request with ONNX Runtime decoding. One variant only (CI time): the
    others (hq_token_only, SAM) follow from the parity tests above plus test_official's torch runs."""
    assert onnx_segmenter.decoder_backend == "onnx"
    _check_against_official(onnx_segmenter, make_picture(320, 200, seed=2), OFFICIAL_OBJECTS, False)


def test_a_live_server_with_samhq_decoder_onnx_answers_as_torch_does(segmenter, onnx_segmenter, monkeypatch):
    """From the outside: the API's segment request to a server started with SAMHQ_DECODER=onnx."""
    import httpx
    from api_fixtures import png_b64
    from fastapi import FastAPI
    from live_server import LiveServer

    from segmentation.api import install_api
    from segmentation.schemas import SegmentationResponse
    from segmentation.service import ModelRegistry
    from segmentation.settings import Settings

    monkeypatch.setenv("SAMHQ_DECODER", "onnx")
    settings = Settings.from_env()
    registry = ModelRegistry(settings)
    app = FastAPI()
    install_api(app, registry, settings)
    picture = make_picture(160, 100, seed=8)
    prompt = [[[40, 30]], [[120, 60], [130, 70]], [[10, 90], [150, 5]]]
    boxes = [None, None, [5, 5, 80, 95]]
    with LiveServer(app) as server, httpx.Client(base_url=server.url, timeout=120) as client:
        response = client.post(
            "/v1/images/segmentations",
            json={"model": HQ_ID, "image_prompt": png_b64(picture), "segment_prompt": prompt, "box_prompt": boxes},
        )
    assert response.status_code == 200, response.text
    assert registry.get(HQ_ID).decoder_backend == "onnx"
    labels = SegmentationResponse.model_validate(response.json()).data[0].to_array()
    embedding = segmenter.embed(picture)
    expected = segmenter.decode(embedding, prompt, None, boxes)
    reference = segmenter.compose(embedding, expected).best.labels
    decoded = registry.get(HQ_ID).decode(embedding, prompt, None, boxes)
    band = 2 * float((decoded.logits - expected.logits).abs().max()) + 1e-7
    assert_labels_agree(labels, reference, label_map_margins(embedding, expected, 1)[0], band)


def test_the_graph_is_exported_once_and_found_again(segmenter, onnx_segmenter):
    path = onnx_segmenter.onnx_decoder.path
    assert path.parent == onnx_decoder.graph_dir() and path.exists()
    assert onnx_decoder.cached_server_graph(segmenter.model, HQ_ID) == path
    assert not list(path.parent.glob("*.part")), "a half-written graph was left behind"


def test_auto_picks_a_backend_by_measuring_and_says_which(segmenter, onnx_segmenter, caplog):
    with caplog.at_level(logging.INFO, logger="segmentation.onnx_decoder"):
        twin = Segmenter(segmenter.loaded, segmenter.cache, segmenter.max_pixels)
        backend = twin.use_decoder("auto")
    lines = [r.getMessage() for r in caplog.records if "decoder:" in r.getMessage()]
    assert len(lines) == 1 and "measured at load" in lines[0], lines
    assert backend == ("onnx" if "decoder: ONNX Runtime" in lines[0] else "torch")


def test_a_missing_runtime_falls_back_to_torch_with_one_log_line(segmenter, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` now raises ImportError
    with caplog.at_level(logging.INFO, logger="segmentation.onnx_decoder"):
        twin = Segmenter(segmenter.loaded, segmenter.cache, segmenter.max_pixels)
        assert twin.use_decoder("onnx") == "torch"
    lines = [r for r in caplog.records if "decoder:" in r.getMessage()]
    assert len(lines) == 1 and lines[0].levelno == logging.WARNING
    assert "decoder: torch" in lines[0].getMessage() and "onnxruntime" in lines[0].getMessage()
    decoded = twin.decode(
        twin.embed(make_picture(320, 200, seed=5)), [[[10, 10]]]
    )  # and torch decodes (cached picture)
    assert decoded.counts == (3,)


def test_an_unknown_decoder_setting_is_refused(segmenter, monkeypatch):
    from segmentation.settings import Settings

    with pytest.raises(ValueError, match="auto, torch or onnx"):
        Segmenter(segmenter.loaded, segmenter.cache).use_decoder("tensorrt")
    monkeypatch.setenv("SAMHQ_DECODER", "fast")
    with pytest.raises(ValueError, match="SAMHQ_DECODER"):
        Settings.from_env()
    monkeypatch.setenv("SAMHQ_DECODER", "ONNX")
    assert Settings.from_env().decoder == "onnx"
