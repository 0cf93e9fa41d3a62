"""SAM / SAM-HQ mask decoding split into a picture-only part and a per-click part.

transformers' decoders recompute on every click what depends on the picture alone (for
SAM-HQ about half of the decoder's work: the compressed ViT features and the embedding
encoder) and slice away the tokens that `multimask_output` does not ask for. Here:

* `picture_features()` runs once per picture and keeps `hq_features` instead of the raw
  intermediate ViT embeddings (smaller, and nothing per click depends on the rest);
* `decode()` runs every object of a prompt through the decoder in one batched call and
  returns all mask tokens with all IoU predictions, so each object can pick its own
  (multimask for a single point, the single-mask token for several).

The decode follows the official SAM-HQ `MaskDecoderHQ.predict_masks`: the masks are built
from the image embedding *as refined by the two-way transformer*. transformers 5.x's
`SamHQMaskDecoder.forward` upscales the unrefined input embedding instead (and with its
height and width swapped); the tests check us against transformers' forward with only
that step corrected.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class DecoderOutput:
    sam_masks: torch.Tensor  # (N, 4, 256, 256) logits: token 0 single-mask, tokens 1-3 multimask
    hq_masks: torch.Tensor | None  # (N, 1, 256, 256) logits of the HQ token (SAM-HQ only)
    iou: torch.Tensor  # (N, 4) predicted IoU of the four SAM tokens


def is_hq(model) -> bool:
    return hasattr(model.mask_decoder, "hq_token")


@torch.inference_mode()
def encode(model, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run the image encoder: (image_embeddings, first global-attention ViT features or None)."""
    output = model.vision_encoder(pixel_values=pixel_values)
    intermediate = getattr(output, "intermediate_embeddings", None)
    return output.last_hidden_state, (intermediate[0] if intermediate else None)


@torch.inference_mode()
def hq_picture_features(model, image_embeddings: torch.Tensor, vit_features: torch.Tensor) -> torch.Tensor:
    """The picture-only addend of the HQ mask features: embedding encoder + compressed ViT features."""
    decoder = model.mask_decoder
    act = decoder.activation
    embed_encode = decoder.encoder_conv2(act(decoder.encoder_norm(decoder.encoder_conv1(image_embeddings))))
    vit = vit_features.permute(0, 3, 1, 2).contiguous()
    compressed = decoder.compress_vit_conv2(act(decoder.compress_vit_norm(decoder.compress_vit_conv1(vit))))
    return embed_encode + compressed


def image_positional_embeddings(model) -> torch.Tensor:
    """The dense positional encoding of the embedding grid: depends on the weights alone."""
    with torch.inference_mode():
        return model.get_image_wide_positional_embeddings()


@torch.inference_mode()
def decode(
    model,
    image_embeddings: torch.Tensor,
    hq_features: torch.Tensor | None,
    positional: torch.Tensor,
    points: torch.Tensor,
    labels: torch.Tensor,
) -> DecoderOutput:
    """Decode N objects at once. `points` (N, P, 2) in the model's 1024 frame, `labels` (N, P)."""
    decoder = model.mask_decoder
    n_objects = points.shape[0]
    sparse, dense = model.prompt_encoder(
        input_points=points.unsqueeze(0), input_labels=labels.unsqueeze(0), input_boxes=None, input_masks=None
    )
    hq = hq_features is not None
    tokens = [decoder.iou_token.weight, decoder.mask_tokens.weight] + ([decoder.hq_token.weight] if hq else [])
    output_tokens = torch.cat(tokens, dim=0).repeat(1, n_objects, 1, 1)
    queries_in = torch.cat([output_tokens, sparse], dim=2).to(decoder.iou_token.weight.dtype)

    _, channels, height, width = image_embeddings.shape
    source = (image_embeddings + dense).repeat_interleave(n_objects, 0)
    source_pe = positional.repeat_interleave(n_objects, 0)
    queries, keys = decoder.transformer(
        point_embeddings=queries_in,
        image_embeddings=source,
        image_positional_embeddings=source_pe,
        attention_similarity=None,
    )
    # keys: (N, 1, H*W, C) → (N, C, H, W), the refined embedding the official decoder upscales.
    refined = keys.transpose(2, 3).reshape(n_objects, channels, height, width)
    act = decoder.activation
    upscaled = act(decoder.upscale_conv2(act(decoder.upscale_layer_norm(decoder.upscale_conv1(refined)))))

    mask_tokens = queries[0, :, 1:, :]  # (N, tokens, C)
    n_sam = len(decoder.output_hypernetworks_mlps)
    hyper = torch.stack([decoder.output_hypernetworks_mlps[i](mask_tokens[:, i, :]) for i in range(n_sam)], dim=1)
    flat = upscaled.flatten(2)  # (N, C/8, 256*256)
    size = upscaled.shape[-2:]
    sam_masks = (hyper @ flat).reshape(n_objects, n_sam, *size)

    hq_masks = None
    if hq:
        mask_features = decoder.mask_conv2(act(decoder.mask_norm(decoder.mask_conv1(upscaled)))) + hq_features
        hq_hyper = decoder.hq_mask_mlp(mask_tokens[:, n_sam, :]).unsqueeze(1)
        hq_masks = (hq_hyper @ mask_features.flatten(2)).reshape(n_objects, 1, *size)

    iou = decoder.iou_prediction_head(queries[0, :, 0, :])  # (N, 4)
    return DecoderOutput(sam_masks=sam_masks, hq_masks=hq_masks, iou=iou)


@dataclass(frozen=True)
class Candidates:
    logits: torch.Tensor  # (N, K, 256, 256): each object's candidates, best first
    scores: torch.Tensor  # (N, K) predicted IoU of each candidate
    counts: torch.Tensor  # (N,) how many of the K are real (1 or 3); the rest repeat the last real one


def rank_candidates(output: DecoderOutput, ambiguous: torch.Tensor, hq_token_only: bool = False) -> Candidates:
    """Each object's masks, ranked by predicted IoU.

    `ambiguous` (N,) bool: single-point objects take the three multimask tokens, ranked;
    the others the single-mask token. With SAM-HQ the HQ mask is added to each (the
    official combination), or used alone when `hq_token_only`: then there is one mask per
    object whatever the number of IoU scores, scored by the best applicable prediction.
    """
    sam, iou = output.sam_masks, output.iou
    n, _, h, w = sam.shape
    multi_scores, order = torch.sort(iou[:, 1:4], dim=1, descending=True)
    multi_masks = torch.gather(sam[:, 1:4], 1, order[:, :, None, None].expand(-1, -1, h, w))
    single_masks = sam[:, 0:1].expand(-1, 3, -1, -1)
    single_scores = iou[:, 0:1].expand(-1, 3)
    choose = ambiguous[:, None]
    scores = torch.where(choose, multi_scores, single_scores)
    masks = torch.where(choose[:, :, None, None], multi_masks, single_masks)
    counts = torch.where(ambiguous, 3, 1)
    if output.hq_masks is not None:
        if hq_token_only:
            masks = output.hq_masks.expand(-1, 3, -1, -1)
            scores = scores[:, 0:1].expand(-1, 3)
            counts = torch.ones_like(counts)
        else:
            masks = masks + output.hq_masks
    return Candidates(logits=masks, scores=scores, counts=counts)


def upscale_logits(
    logits: torch.Tensor, resized_size: tuple[int, int], original_size: tuple[int, int], pad_size: int = 1024
) -> torch.Tensor:
    """Low-res logits (M, 256, 256) → (M, H, W) at the picture's size, as the processor's post-processing does."""
    x = F.interpolate(logits[:, None].float(), (pad_size, pad_size), mode="bilinear", align_corners=False)
    x = x[..., : resized_size[0], : resized_size[1]]
    return F.interpolate(x, original_size, mode="bilinear", align_corners=False)[:, 0]
