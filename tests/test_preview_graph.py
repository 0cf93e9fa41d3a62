"""The hover preview's SAM-tokens graph (`export_browser_decoder(sam_only=True)`) against the engine's torch decode.

It must give the candidate the engine ranks first among SAM's own tokens (the same multimask rule; the HQ mask,
which a click adds, left out), with its score, and take no hq_features, so the page need not fetch them; fed, as
in the page's worker, its picture graph's outputs (keys, values, queries, positions) computed once per picture."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from conftest import make_picture

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from segmentation import decoder as dec  # noqa: E402
from segmentation import onnx_graph  # noqa: E402
from segmentation.prompts import model_frame_arrays  # noqa: E402

LOGIT_TOLERANCE = 1e-4  # relative to the logits' size
# one point (ambiguous: the multimask rule), one exclude point, several points, box + point
OBJECTS = [
    ([[60, 70]], [1], None),
    ([[200, 90]], [0], None),
    ([[100, 80], [20, 150]], [1, 0], None),
    ([[70, 75]], [1], [10, 10, 300, 190]),
]


def test_sam_only_graph_gives_sams_first_candidate(segmenter, tmp_path):
    import onnxruntime
    import torch

    path = onnx_graph.export_browser_decoder(segmenter.model, tmp_path / "sam.onnx", sam_only=True)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    picture_session = onnxruntime.InferenceSession(
        str(onnx_graph.picture_graph_path(path)), providers=["CPUExecutionProvider"]
    )
    picture_outputs = [o.name for o in picture_session.get_outputs()]
    assert {i.name for i in session.get_inputs()} == {"tokens", *picture_outputs, "point_coords", "point_labels"}
    embedding = segmenter.embed(make_picture(320, 200, seed=3))
    tokens = embedding.features.tokens.numpy()
    projected = dict(zip(picture_outputs, picture_session.run(None, {"tokens": tokens})))
    decoded = segmenter.decode(embedding, [o[0] for o in OBJECTS], [o[1] for o in OBJECTS], [o[2] for o in OBJECTS])
    assert decoded.logits.shape[0] == len(OBJECTS)
    sizes = (embedding.original_size, embedding.resized_size)
    positions = dec.positional_tokens(segmenter.model)
    for i, obj in enumerate(decoded.prompt.objects):
        coords, kinds = onnx_graph.meta_prompt(*model_frame_arrays([obj], *sizes))
        logits, score = session.run(
            None, {"tokens": tokens, **projected, "point_coords": coords, "point_labels": kinds}
        )
        # the engine's decode of the same prompt (its tokens as onnx_graph's parity tests check them)
        sparse = onnx_graph.PromptTokens(segmenter.model)(torch.from_numpy(coords), torch.from_numpy(kinds))
        q, k = dec.decode_tokens(segmenter.model, embedding.features, positions, sparse)
        output = dec.decode_masks(segmenter.model, embedding.features, q, k)
        expected, expected_score = onnx_graph.first_ranked(
            dataclasses.replace(output, hq_masks=None), torch.from_numpy(kinds)
        )
        expected = expected[0, 0].numpy()
        assert np.abs(expected).max() > 0.1, "logits too small for the comparison to mean anything"
        scale = max(1.0, float(np.abs(expected).max()))
        assert np.abs(logits[0, 0] - expected).max() <= LOGIT_TOLERANCE * scale, f"object {i + 1}"
        assert abs(float(score[0]) - float(expected_score[0])) <= LOGIT_TOLERANCE * max(1.0, abs(float(score[0])))
