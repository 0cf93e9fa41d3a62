"""SAM / SAM-HQ mask decoding split into a picture-only part and a per-click part.

transformers' decoders recompute on every click what depends on the picture alone and
slice away the tokens that `multimask_output` does not ask for. Here:

* `picture_features()` runs once per picture and keeps what the decoder can compute without
  a prompt: the image embedding plus the no-mask embedding in the transformer's token layout,
  the first two-way layer's projections of it (token→image keys and values, image→token
  queries), and for SAM-HQ the HQ features (embedding encoder + compressed ViT features)
  instead of the raw intermediate ViT embeddings. Smaller than what transformers keeps, and
  about half of the SAM-HQ decoder's work no longer runs per click.
* `decode()` runs objects of one token layout (point count, box or not) through the decoder
  in one batched call and returns all mask tokens with all IoU predictions, so each object
  can pick its own (multimask for a single point alone, the single-mask token otherwise).
  Objects are never padded to each other's length: the engine groups them by layout.

Every step applies transformers' own modules to the same values in the same order as its
forward does; only the grouping changes (once per picture instead of once per click and
object). The decode follows the official SAM-HQ `MaskDecoderHQ.predict_masks` where
transformers departs from it (docs/UPSTREAM.md): the masks are built from the image
embedding *as refined by the two-way transformer* (transformers 5.x upscales the unrefined
input embedding, height and width swapped), and the two-way transformer's norms use the
official eps (`use_official_layer_norms`). The tests compare each object with a port of the
official inference code (tests/test_official.py: IoU >= 0.999, predicted IoU within 1e-4)
and with transformers' forward with that one step corrected (tests/test_engine.py).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch
import torch.nn.functional as F
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.sam_hq.modeling_sam_hq import eager_attention_forward

# Official SAM / SAM-HQ (segment_anything/modeling/transformer.py) build the two-way transformer's
# norm1-norm4 as `nn.LayerNorm(embedding_dim)`, PyTorch's default eps 1e-5; transformers builds them
# with `config.layer_norm_eps`, 1e-6. The weights were trained with 1e-5.
OFFICIAL_TWO_WAY_EPS = 1e-5


def use_official_layer_norms(model) -> None:
    """Give every LayerNorm of the prompt/decoder path the epsilon of the official code. The one
    place this is done; `models.load_model` calls it on every model it loads.

    Audit against SysCV/sam-hq (and facebookresearch/segment-anything for SAM), transformers 5.x:

    | official                                    | eps  | transformers                         | eps  |
    |---------------------------------------------|------|--------------------------------------|------|
    | TwoWayAttentionBlock.norm1-norm4            | 1e-5 | layers[i].layer_norm1-4              | 1e-6 | fixed here
    | TwoWayTransformer.norm_final_attn           | 1e-5 | layer_norm_final_attn                | 1e-5 |
    | output_upscaling LayerNorm2d                | 1e-6 | upscale_layer_norm                   | 1e-6 |
    | HQ compress_vit_feat / embedding_encoder /  | 1e-6 | compress_vit_norm / encoder_norm /   | 1e-6 |
    |   embedding_maskfeature LayerNorm2d         |      |   mask_norm                          |      |
    | ViT blocks (build_sam: eps=1e-6), neck      | 1e-6 | vision layer_norm1/2, neck           | 1e-6 |
    | prompt mask_downscaling LayerNorm2d (unused)| 1e-6 | mask_embed layer_norm1/2             | 1e-6 |

    The test `tests/test_official.py` checks every norm against the official port in tests/.
    """
    transformer = model.mask_decoder.transformer
    for layer in transformer.layers:
        for name in ("layer_norm1", "layer_norm2", "layer_norm3", "layer_norm4"):
            getattr(layer, name).eps = OFFICIAL_TWO_WAY_EPS
    transformer.layer_norm_final_attn.eps = OFFICIAL_TWO_WAY_EPS  # already so in transformers 5.x; kept explicit


@dataclass(frozen=True)
class PictureFeatures:
    """What the decoder needs of one picture, computed once. Token tensors are (1, 1, H*W, width)."""

    tokens: torch.Tensor  # width C: image embedding + no-mask dense embedding, token-major
    keys: torch.Tensor  # width C/2: first layer, token→image attention, key projection of tokens + positions
    values: torch.Tensor  # width C/2: first layer, token→image attention, value projection of tokens
    queries: torch.Tensor  # width C/2: first layer, image→token attention, query projection of tokens + positions
    grid: tuple[int, int]  # (height, width) of the embedding grid, 64×64 for published checkpoints
    hq_features: torch.Tensor | None  # (1, C/8, 4H, 4W) picture-only addend of the HQ mask features

    def tensors(self) -> list[torch.Tensor]:
        return [t for f in fields(self) if isinstance(t := getattr(self, f.name), torch.Tensor)]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def to(self, device: torch.device, pin: bool = False) -> PictureFeatures:
        """The same features on `device`; host copies pinned when `pin` (fast transfers back)."""

        def move(tensor: torch.Tensor | None) -> torch.Tensor | None:
            if tensor is None or tensor.device == device:
                return tensor
            moved = tensor.to(device, non_blocking=True)
            return moved.pin_memory() if pin else moved

        return replace(
            self,
            **{f.name: move(getattr(self, f.name)) for f in fields(self) if f.name != "grid"},
        )


@dataclass(frozen=True)
class DecoderOutput:
    sam_masks: torch.Tensor  # (N, 4, 256, 256) logits: token 0 single-mask, tokens 1-3 multimask
    hq_masks: torch.Tensor | None  # (N, 1, 256, 256) logits of the HQ token (SAM-HQ only)
    iou: torch.Tensor  # (N, 4) predicted IoU of the four SAM tokens


def is_hq(model) -> bool:
    return hasattr(model.mask_decoder, "hq_token")


def to_tokens(grid: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) → (B, 1, H*W, C) contiguous: the two-way transformer's layout, so the
    per-click element-wise work runs on contiguous memory instead of transposed views."""
    return grid.flatten(2).transpose(1, 2).unsqueeze(1).contiguous()


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


def positional_tokens(model) -> torch.Tensor:
    """The dense positional encoding of the embedding grid, token-major: depends on the weights alone."""
    with torch.inference_mode():
        return to_tokens(model.get_image_wide_positional_embeddings())


@torch.inference_mode()
def picture_features(
    model, image_embeddings: torch.Tensor, vit_features: torch.Tensor | None, positions: torch.Tensor
) -> PictureFeatures:
    """Everything of the decoder that depends on the picture alone (see the module docstring)."""
    no_mask = model.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1)
    tokens = to_tokens(image_embeddings + no_mask)
    first = model.mask_decoder.transformer.layers[0]
    with_positions = tokens + positions
    hq = is_hq(model) and vit_features is not None
    return PictureFeatures(
        tokens=tokens,
        keys=first.cross_attn_token_to_image.k_proj(with_positions),
        values=first.cross_attn_token_to_image.v_proj(tokens),
        queries=first.cross_attn_image_to_token.q_proj(with_positions),
        grid=(int(image_embeddings.shape[-2]), int(image_embeddings.shape[-1])),
        hq_features=hq_picture_features(model, image_embeddings, vit_features) if hq else None,
    )


def _attend(attention, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """`SamHQAttention.forward` from its projected inputs on: heads, attention, output projection.

    Inputs are (batch, point_batch, tokens, internal); a picture's cached projection has
    batch 1 and is broadcast over the objects: without copying on the CPU, whose kernels are
    tested with it; copied elsewhere, where zero-stride batches are not verified.
    """
    point_batch = query.shape[1]
    heads = attention.num_attention_heads
    query, key, value = (attention._separate_heads(x, heads) for x in (query, key, value))
    batch = max(query.shape[0], key.shape[0])
    query, key, value = (x.expand(batch, -1, -1, -1) for x in (query, key, value))
    if query.device.type != "cpu":
        query, key, value = (x.contiguous() for x in (query, key, value))
    interface = ALL_ATTENTION_FUNCTIONS.get_interface(attention.config._attn_implementation, eager_attention_forward)
    output, _ = interface(
        attention, query, key, value, attention_mask=None, dropout=0.0, scaling=attention.scaling, is_causal=False
    )
    return attention.out_proj(attention._recombine_heads(output, point_batch))


def _two_way_transformer(
    transformer, point_embeddings: torch.Tensor, picture: PictureFeatures, positions: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """`SamHQTwoWayTransformer.forward` with the first layer's picture-only projections taken from
    `picture`. Returns (queries (1, N, T, C), refined image tokens (N, 1, H*W, C))."""
    first = transformer.layers[0]
    if not first.skip_first_layer_pe:
        raise ValueError("unexpected two-way transformer: its first layer adds positions to the tokens")
    queries, _ = first.self_attn(query=point_embeddings, key=point_embeddings, value=point_embeddings)
    queries = first.layer_norm1(queries)
    to_image = first.cross_attn_token_to_image
    attn_out = _attend(to_image, to_image.q_proj(queries + point_embeddings), picture.keys, picture.values)
    queries = first.layer_norm2(queries + attn_out)
    queries = first.layer_norm3(queries + first.mlp(queries))
    to_token = first.cross_attn_image_to_token
    with_positions = queries + point_embeddings
    attn_out = _attend(to_token, picture.queries, to_token.k_proj(with_positions), to_token.v_proj(queries))
    keys = first.layer_norm4(picture.tokens + attn_out)

    for layer in transformer.layers[1:]:
        queries, keys, _ = layer(
            queries=queries,
            keys=keys,
            query_point_embedding=point_embeddings,
            key_point_embedding=positions,
            attention_similarity=None,
        )
    attn_out, _ = transformer.final_attn_token_to_image(
        query=queries + point_embeddings, key=keys + positions, value=keys
    )
    queries = transformer.layer_norm_final_attn(queries + attn_out)
    return queries, keys


@torch.inference_mode()
def decode(
    model,
    picture: PictureFeatures,
    positions: torch.Tensor,
    points: torch.Tensor | None,
    labels: torch.Tensor | None,
    boxes: torch.Tensor | None = None,
) -> DecoderOutput:
    """Decode N objects of one token layout at once. `points` (N, P, 2) with `labels` (N, P), and/or
    `boxes` (N, 4) as x0, y0, x1, y1, all in the model's 1024 frame; `positions` from
    `positional_tokens(model)`.

    The prompt encoder is official SAM's: points then the box's two corners (labels 2 and 3);
    one "not a point" pad token after the points when there is no box. Objects of different
    layouts must not share a call (padding one to another's length changes its mask): see
    `prompts.Prompt.layout_groups`."""
    queries, keys = decode_tokens(model, picture, positions, sparse_tokens(model, points, labels, boxes))
    return decode_masks(model, picture, queries, keys)


@torch.inference_mode()
def sparse_tokens(
    model, points: torch.Tensor | None, labels: torch.Tensor | None, boxes: torch.Tensor | None = None
) -> torch.Tensor:
    """The prompt encoder's sparse tokens (1, N, T, C) of N objects of one layout (see `decode`)."""
    if points is None and boxes is None:
        raise ValueError("decode needs points, boxes or both")
    sparse, _ = model.prompt_encoder(
        input_points=points.unsqueeze(0) if points is not None else None,
        input_labels=labels.unsqueeze(0) if labels is not None else None,
        input_boxes=boxes.unsqueeze(0) if boxes is not None else None,
        input_masks=None,
    )
    return sparse


@torch.inference_mode()
def decode_tokens(
    model, picture: PictureFeatures, positions: torch.Tensor, sparse: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The two-way transformer over the output tokens and the prompt's sparse tokens (1, N, T, C): (queries
    (1, N, tokens, C), refined image tokens (N, 1, H*W, C)). The predicted IoUs (`predicted_iou`) need only
    the queries: a caller may drop objects on them before paying for their masks (`decode_masks`)."""
    decoder = model.mask_decoder
    n_objects = sparse.shape[1]
    hq = picture.hq_features is not None
    tokens = [decoder.iou_token.weight, decoder.mask_tokens.weight] + ([decoder.hq_token.weight] if hq else [])
    output_tokens = torch.cat(tokens, dim=0).repeat(1, n_objects, 1, 1)
    queries_in = torch.cat([output_tokens, sparse], dim=2).to(decoder.iou_token.weight.dtype)
    return _two_way_transformer(decoder.transformer, queries_in, picture, positions)


def predicted_iou(model, queries: torch.Tensor) -> torch.Tensor:
    """(N, 4) predicted IoU of the four SAM tokens, from `decode_tokens`' queries."""
    with torch.inference_mode():
        return model.mask_decoder.iou_prediction_head(queries[0, :, 0, :])


@torch.inference_mode()
def decode_masks(model, picture: PictureFeatures, queries: torch.Tensor, keys: torch.Tensor) -> DecoderOutput:
    """The masks (the expensive part: upscaling and, with SAM-HQ, the HQ mask features) and IoUs of
    `decode_tokens`' output; rows of queries/keys may be a subset of the decoded objects."""
    decoder = model.mask_decoder
    n_objects = keys.shape[0]
    hq = picture.hq_features is not None
    # keys: (N, 1, H*W, C) → (N, C, H, W), the refined embedding the official decoder upscales.
    height, width = picture.grid
    refined = keys.transpose(2, 3).reshape(n_objects, keys.shape[-1], height, width)
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
        mask_features = decoder.mask_conv2(act(decoder.mask_norm(decoder.mask_conv1(upscaled)))) + picture.hq_features
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
