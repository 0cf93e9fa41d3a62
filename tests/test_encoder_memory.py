"""Global attention in head chunks (segmentation/encoder_memory.py) computes what transformers computes.

The reference is transformers' own, unpatched forward of the same weights: the encoder's
last_hidden_state and intermediate embeddings agree to float32 rounding, and the engine's masks
agree wherever they are farther than rounding from a decision (tests/agreement.py).
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from agreement import assert_labels_agree, label_map_margins
from conftest import HQ_ID, SAM_ID, make_picture

from segmentation.encoder_memory import chunk_global_attention
from segmentation.offline import _configs


def build(family: str, shape: str, attention: str, seed: int = 0):
    from transformers import SamHQModel, SamModel

    torch.manual_seed(seed)
    config = _configs(family, shape)
    model_class = SamHQModel if family == "sam_hq" else SamModel
    model = model_class._from_config(config, attn_implementation=attention).eval()
    kind = "SdpaAttention" if attention == "sdpa" else "VisionAttention"
    assert all(type(layer.attn).__name__.endswith(kind) for layer in model.vision_encoder.layers)
    return model


def unpatched(model):
    """A copy of `model` that runs transformers' own attention forward everywhere."""
    reference = copy.deepcopy(model)
    for layer in reference.vision_encoder.layers:
        layer.attn.__dict__.pop("forward", None)
    return reference


def encoder_outputs(model, pixels: torch.Tensor) -> list[torch.Tensor]:
    with torch.inference_mode():
        output = model.vision_encoder(pixel_values=pixels)
    return [output.last_hidden_state, *(getattr(output, "intermediate_embeddings", None) or [])]


def assert_same_encoding(model, chunked, pixels: torch.Tensor, atol: float) -> None:
    expected, actual = encoder_outputs(model, pixels), encoder_outputs(chunked, pixels)
    assert len(actual) == len(expected) >= 1
    for want, got in zip(expected, actual, strict=True):
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-5, atol=atol)


@pytest.mark.parametrize("family", ["sam_hq", "sam"])
@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_tiny_encoder_matches_transformers(family: str, attention: str) -> None:
    model = build(family, "tiny", attention)
    chunked = copy.deepcopy(model)
    # 2 heads, batch 2: chunks of 1 head, and of 3 (a chunk crossing pictures, and a short last one)
    pixels = torch.randn(2, 3, 1024, 1024, generator=torch.Generator().manual_seed(1))
    for heads in (1, 3):
        assert chunk_global_attention(chunked, heads_per_chunk=heads) == 1  # the one global layer; windowed left
        windowed = [layer for layer in chunked.vision_encoder.layers if layer.window_size != 0]
        assert windowed and all("forward" not in layer.attn.__dict__ for layer in windowed)
        assert_same_encoding(model, chunked, pixels, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_vit_b_width_global_layer_matches_transformers(attention: str) -> None:
    """ViT-B's width and heads (768, 12) over 64x64 tokens, in the default chunks."""
    model = build("sam_hq", "base-decoder", attention)
    chunked = copy.deepcopy(model)
    assert chunk_global_attention(chunked) == 1
    pixels = torch.randn(1, 3, 1024, 1024, generator=torch.Generator().manual_seed(2))
    assert_same_encoding(model, chunked, pixels, atol=1e-4)


def test_bad_chunk_size_refused() -> None:
    with pytest.raises(ValueError, match="heads_per_chunk"):
        chunk_global_attention(build("sam", "tiny", "eager"), heads_per_chunk=0)


@pytest.mark.parametrize("model_id", [HQ_ID, SAM_ID])
def test_engine_masks_identical(model_id: str) -> None:
    """`load_model` chunks the global attention; the engine's masks equal those of transformers' forward
    but for pixels within float32 rounding of a decision."""
    from segmentation.engine import Segmenter
    from segmentation.models import load_model

    loaded = load_model(model_id, device="cpu")
    layers = loaded.model.vision_encoder.layers
    assert any("forward" in layer.attn.__dict__ for layer in layers)  # applied at load time
    one_head = copy.deepcopy(loaded.model)
    chunk_global_attention(one_head, heads_per_chunk=1)
    picture = make_picture(320, 200, seed=4)
    prompt = [[[60, 70]], [[200, 120], [230, 150]]]
    results, margins = [], None
    for model in (unpatched(loaded.model), loaded.model, one_head):
        segmenter = Segmenter(dataclasses.replace(loaded, model=model))
        embedding = segmenter.embed(picture)
        results.append(segmenter.segment(embedding, prompt, candidates=3).label_maps)
        if margins is None:  # where transformers' own forward is within rounding of a decision
            margins = label_map_margins(embedding, segmenter.decode(embedding, prompt), candidates=3)
    reference = results[0]
    for maps in results[1:]:
        for want, got, margin in zip(reference, maps, margins, strict=True):
            assert_labels_agree(got, want, margin, band=1e-4)  # attention in chunks sums in another order
