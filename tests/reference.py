"""A second reference, computed with transformers' own full forward (no engine code).

The first reference is the port of the official code (tests/official_reference.py): it says
what each object's mask must be. This one checks the other claim of `segmentation/decoder.py`,
that splitting the decoder into a per-picture and a per-click part changes nothing but the
grouping: one object through transformers' uncached forward, with one step corrected.

transformers 5.x's `SamHQMaskDecoder.forward` builds masks from the image embedding it fed
*into* the two-way transformer (then `.transpose(2, 3)`), where the official SAM-HQ uses the
embedding the transformer *returns*. `corrected_hq_forward` runs transformers' own full forward
with a wrapper around the two-way transformer that writes the refined keys back into the
decoder's input tensor, laid out so the decoder's own `.transpose(2, 3).reshape(...)` recovers
them: everything else (vision encoder, prompt encoder, token slicing, multimask sort, HQ sum)
is transformers' code. If transformers fixes its decoder, the write-back is simply unused.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch

PAD = -1  # the padding label under test: official SAM's "not a point"


class _RefinedKeysWriteBack(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, point_embeddings, image_embeddings, image_positional_embeddings, **kwargs):
        queries, keys = self.inner(
            point_embeddings=point_embeddings,
            image_embeddings=image_embeddings,
            image_positional_embeddings=image_positional_embeddings,
            **kwargs,
        )
        n, channels, height, width = image_embeddings.shape
        refined = keys.transpose(2, 3).reshape(n, channels, height, width)
        image_embeddings.copy_(refined.transpose(2, 3))
        return queries, keys


@contextlib.contextmanager
def corrected_hq_decoder(model):
    decoder = model.mask_decoder
    original = decoder.transformer
    decoder.transformer = _RefinedKeysWriteBack(original)
    try:
        yield model
    finally:
        decoder.transformer = original


def reference_object_logits(model, processor, rgb, points, labels, hq_token_only=False):
    """One object, alone, through transformers' full forward (pixel_values, no cache). The model's
    norms are as loaded (`models.load_model` gives them the official epsilon).

    Returns (logits at the picture's size (K, H, W), scores (K,)) for its ranked candidates.
    """
    points = [list(map(float, p)) for p in points]
    labels = list(labels)
    inputs = processor(images=rgb, input_points=[[points]], input_labels=[[labels]], return_tensors="pt")
    multimask = sum(1 for label in labels if label != PAD) == 1
    with (
        torch.inference_mode(),
        corrected_hq_decoder(model) if hasattr(model.mask_decoder, "hq_token") else contextlib.nullcontext(),
    ):
        kwargs = {"hq_token_only": hq_token_only} if hasattr(model.mask_decoder, "hq_token") else {}
        out = model(
            pixel_values=inputs["pixel_values"],
            input_points=inputs["input_points"],
            input_labels=inputs["input_labels"],
            multimask_output=multimask,
            **kwargs,
        )
    masks = processor.post_process_masks(
        out.pred_masks, inputs["original_sizes"], inputs["reshaped_input_sizes"], binarize=False
    )[0][0]
    scores = out.iou_scores[0, 0]
    masks, scores = masks.float().numpy(), scores.float().numpy()
    if masks.shape[0] == 1 and scores.shape[0] > 1:  # hq_token_only + multimask: one mask, three scores
        return masks, scores.max(keepdims=True)
    order = np.argsort(-scores, kind="stable")  # the policy: best predicted IoU first (SamModel does not sort)
    return masks[order], scores[order]


def reference_label_map(per_object_logits: list[np.ndarray]) -> np.ndarray:
    """Highest logit > 0 wins; 0 background. Plain numpy."""
    stack = np.stack(per_object_logits)
    best = stack.argmax(axis=0)
    claimed = stack.max(axis=0) > 0
    return np.where(claimed, best + 1, 0).astype(np.uint8)
