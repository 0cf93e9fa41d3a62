"""The browser's graphs (`onnx_graph.export_browser_decoder`) against the engine's torch decode.

Once per picture the page runs the picture graph on the picture's tokens: it must give the first layer's
projections the engine caches (`PictureFeatures`) and the positional grid. Per hover it feeds the decoder graph
the tokens, those outputs, the HQ features and one object's prompt in Meta's ONNX convention; it must give the
candidate the engine ranks first for that object, and its score.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import make_picture

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from segmentation import onnx_graph  # noqa: E402
from segmentation.prompts import model_frame_arrays  # noqa: E402

LOGIT_TOLERANCE = 1e-4  # relative to the logits' size (the test checkpoints' are of order 1-10)

# (points, labels, box) in picture pixels: one point, one exclude point, several points, box alone,
# box + one point, box + points.
OBJECTS = [
    ([[60, 70]], [1], None),
    ([[200, 90]], [0], None),
    ([[100, 80], [130, 95], [20, 150]], [1, 1, 0], None),
    ([], [], [30, 40, 200, 150]),
    ([[70, 75]], [1], [10, 10, 300, 190]),
    ([[0, 0], [250, 60]], [1, 0], [0, 0, 320, 200]),
]


PICTURE_OUTPUTS = ["keys", "values", "queries", "positions"]


@pytest.fixture(scope="module")
def sessions(segmenter, tmp_path_factory):
    """(picture graph, decoder graph) sessions, as the page's worker holds them."""
    import onnxruntime

    path = onnx_graph.export_browser_decoder(segmenter.model, tmp_path_factory.mktemp("onnx") / "browser.onnx")
    picture = onnx_graph.picture_graph_path(path)
    assert picture.exists() and picture.parent == path.parent
    return tuple(onnxruntime.InferenceSession(str(p), providers=["CPUExecutionProvider"]) for p in (picture, path))


def test_graph_inputs_and_outputs_are_the_documented_ones(sessions):
    picture, decoder = sessions
    assert [i.name for i in picture.get_inputs()] == ["tokens"]
    assert [o.name for o in picture.get_outputs()] == PICTURE_OUTPUTS
    inputs = {i.name: i.shape for i in decoder.get_inputs()}
    assert set(inputs) == {"tokens", *PICTURE_OUTPUTS, "hq_features", "point_coords", "point_labels"}
    assert isinstance(inputs["point_coords"][1], str), "the number of points must be dynamic"
    assert [o.name for o in decoder.get_outputs()] == ["low_res_logits", "score"]


def test_picture_graph_gives_the_engines_cached_projections(segmenter, sessions):
    from segmentation import decoder as dec

    features = segmenter.embed(make_picture(320, 200, seed=5)).features
    keys, values, queries, positions = sessions[0].run(None, {"tokens": features.tokens.numpy()})
    expected = {
        "keys": features.keys,
        "values": features.values,
        "queries": features.queries,
        "positions": dec.positional_tokens(segmenter.model),
    }
    for name, got in zip(PICTURE_OUTPUTS, (keys, values, queries, positions)):
        want = expected[name].float().numpy()
        assert got.shape == want.shape, name
        assert np.abs(got - want).max() <= 1e-5 * max(1.0, float(np.abs(want).max())), name


def test_each_prompt_shape_gives_the_engines_first_candidate(segmenter, sessions):
    picture_session, browser_session = sessions
    embedding = segmenter.embed(make_picture(320, 200, seed=3))
    features = embedding.features
    projected = dict(zip(PICTURE_OUTPUTS, picture_session.run(None, {"tokens": features.tokens.numpy()})))
    decoded = segmenter.decode(embedding, [o[0] for o in OBJECTS], [o[1] for o in OBJECTS], [o[2] for o in OBJECTS])
    sizes = (embedding.original_size, embedding.resized_size)
    for i, obj in enumerate(decoded.prompt.objects):
        coords, kinds = onnx_graph.meta_prompt(*model_frame_arrays([obj], *sizes))
        logits, score = browser_session.run(
            None,
            {
                "tokens": features.tokens.numpy(),
                **projected,
                "hq_features": features.hq_features.numpy(),
                "point_coords": coords,
                "point_labels": kinds,
            },
        )
        expected = decoded.logits[i, 0].numpy()
        assert logits.shape == (1, 1, *expected.shape) and score.shape == (1,)
        assert np.abs(expected).max() > 0.1, "logits too small for the comparison to mean anything"
        scale = max(1.0, float(np.abs(expected).max()))
        assert np.abs(logits[0, 0] - expected).max() <= LOGIT_TOLERANCE * scale, f"object {i + 1}"
        assert abs(float(score[0]) - float(decoded.scores[i, 0])) <= LOGIT_TOLERANCE * max(1.0, abs(score[0]))
