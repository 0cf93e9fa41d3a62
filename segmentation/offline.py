"""Random-weight SAM / SAM-HQ checkpoints laid out in a Hugging Face cache.

The hub is not always reachable (CI, air-gapped machines), yet the real loading path
(`from_pretrained("syscv-community/sam-hq-vit-base")`) must run in tests and benchmarks.
These helpers write a checkpoint with `save_pretrained` into
`HF_HOME/hub/models--ORG--NAME/snapshots/REV/` plus `refs/main`, exactly where
`huggingface_hub` looks for it in offline mode.

Random weights give meaningless masks: use them for plumbing and speed, never for quality.
"""

from __future__ import annotations

from pathlib import Path

# transformers' SAM configs initialise weights with std 1e-10; activations then vanish
# into denormals and CPU kernels crawl. 0.02 keeps the numbers in a normal range.
INIT_STD = 0.02

# Encoder shapes of the published checkpoints (hidden size, depth, heads, global-attention layers).
VIT_SHAPES: dict[str, dict] = {
    "base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, global_attn_indexes=[2, 5, 8, 11]),
    "large": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, global_attn_indexes=[5, 11, 17, 23]),
    "huge": dict(hidden_size=1280, num_hidden_layers=32, num_attention_heads=16, global_attn_indexes=[7, 15, 23, 31]),
    # Small enough for unit tests on a 2-core CPU, same input resolution and code paths.
    "tiny": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, global_attn_indexes=[1]),
    # The published decoder (and ViT-B's feature width) behind a one-layer encoder: tests of the
    # decoder at the sizes it runs at in production, without the cost of a real encoder.
    "base-decoder": dict(hidden_size=768, num_hidden_layers=1, num_attention_heads=12, global_attn_indexes=[0]),
}

SNAPSHOT_REVISION = "0" * 40


def _configs(family: str, shape: str):
    from transformers import SamConfig, SamHQConfig

    vit = dict(VIT_SHAPES[shape], initializer_range=INIT_STD)
    tiny = shape == "tiny"
    hidden = 32 if tiny else 256
    vit["output_channels"] = hidden
    vit["num_pos_feats"] = hidden // 2
    prompt = dict(hidden_size=hidden, initializer_range=INIT_STD)
    decoder = dict(hidden_size=hidden, initializer_range=INIT_STD)
    if tiny:
        decoder.update(mlp_dim=64, iou_head_hidden_dim=32, num_attention_heads=2)
    if family == "sam_hq":
        decoder["vit_dim"] = vit["hidden_size"]
        return SamHQConfig(
            vision_config=vit, prompt_encoder_config=prompt, mask_decoder_config=decoder, initializer_range=INIT_STD
        )
    return SamConfig(
        vision_config=vit, prompt_encoder_config=prompt, mask_decoder_config=decoder, initializer_range=INIT_STD
    )


def build_random_model(family: str = "sam_hq", shape: str = "tiny", seed: int = 0, logit_gain: float = 1.0):
    """A randomly initialised `SamHQModel` (family "sam_hq") or `SamModel` (family "sam").

    `logit_gain` scales the last layer of the mask hypernetworks and the IoU head: random
    weights give logits near 1e-3, where an absolute tolerance says nothing; tests use a
    gain that brings them to order 1, like a trained model's.
    """
    import torch
    from transformers import SamHQModel, SamModel

    torch.manual_seed(seed)
    config = _configs(family, shape)
    model_class = SamHQModel if family == "sam_hq" else SamModel
    model = model_class(config).eval()
    if logit_gain != 1.0:
        decoder = model.mask_decoder
        heads = list(decoder.output_hypernetworks_mlps) + [decoder.iou_prediction_head]
        heads += [decoder.hq_mask_mlp] if hasattr(decoder, "hq_mask_mlp") else []
        with torch.no_grad():
            for head in heads:
                head.proj_out.weight.mul_(logit_gain)
                head.proj_out.bias.mul_(logit_gain)
    return model


def build_processor(family: str = "sam_hq"):
    from transformers import SamHQProcessor, SamProcessor
    from transformers.models.sam.image_processing_pil_sam import SamImageProcessorPil

    processor_class = SamHQProcessor if family == "sam_hq" else SamProcessor
    return processor_class(image_processor=SamImageProcessorPil())


def save_random_checkpoint(
    directory: str | Path, family: str = "sam_hq", shape: str = "tiny", seed: int = 0, logit_gain: float = 1.0
) -> Path:
    """Write model and processor to a plain local folder (loadable by path)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    build_random_model(family, shape, seed, logit_gain).save_pretrained(directory)
    build_processor(family).save_pretrained(directory)
    return directory


def install_in_hf_cache(
    hf_home: str | Path,
    model_id: str,
    family: str = "sam_hq",
    shape: str = "tiny",
    seed: int = 0,
    logit_gain: float = 1.0,
) -> Path:
    """Lay a random checkpoint out under `hf_home` as the hub cache would hold `model_id`.

    Run with `HF_HOME=hf_home HF_HUB_OFFLINE=1` and `from_pretrained(model_id)` finds it.
    Returns the snapshot folder.
    """
    repo_dir = Path(hf_home) / "hub" / ("models--" + model_id.replace("/", "--"))
    snapshot = save_random_checkpoint(repo_dir / "snapshots" / SNAPSHOT_REVISION, family, shape, seed, logit_gain)
    (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs" / "main").write_text(SNAPSHOT_REVISION)
    return snapshot
