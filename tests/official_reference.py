"""The official SAM-HQ inference path, ported to plain torch: the tests' independent reference.

Ported from SysCV/sam-hq (https://github.com/SysCV/sam-hq, commit fb181f8; Apache License 2.0,
Copyright (c) Meta Platforms, Inc. and affiliates, modified by the HQ-SAM team), itself derived
from facebookresearch/segment-anything (Apache-2.0):

* segment_anything/modeling/common.py: `MLPBlock`, `LayerNorm2d`
* segment_anything/modeling/transformer.py: `TwoWayTransformer`, `TwoWayAttentionBlock`, `Attention`
* segment_anything/modeling/prompt_encoder.py: `PromptEncoder`, `PositionEmbeddingRandom`
* segment_anything/modeling/mask_decoder_hq.py: `MaskDecoderHQ`, `MLP`
* segment_anything/modeling/mask_decoder.py: `MaskDecoder` (plain SAM, for facebook/sam-*)
* segment_anything/predictor.py: `SamPredictor.predict` / `predict_torch`
* segment_anything/utils/transforms.py: `ResizeLongestSide.apply_coords` / `apply_boxes`
* segment_anything/modeling/sam.py: `Sam.postprocess_masks`

The official module structure and attribute names are kept, so the weights of our random-weight
Hugging Face checkpoints load into it by renaming state-dict keys (`official_state_dict`,
loaded with `strict=True`: every weight is accounted for). Nothing of transformers' prompt
encoder or mask decoder runs here.

NOT ported: the ViT image encoder and the picture's resizing/normalisation. `OfficialPredictor.set_image`
takes the image embedding and the first global-attention ViT features ("interm_embeddings[0]")
from transformers' vision encoder, run on transformers' processor's pixel values. The encoder is
not what these tests question; the prompt path, the decoder and the post-processing are.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from agreement import assert_signs_agree
from torch import Tensor, nn
from torch.nn import functional as F

# ---- common.py -----------------------------------------------------------------------------


class MLPBlock(nn.Module):
    def __init__(self, embedding_dim: int, mlp_dim: int, act=nn.GELU) -> None:
        super().__init__()
        self.lin1 = nn.Linear(embedding_dim, mlp_dim)
        self.lin2 = nn.Linear(mlp_dim, embedding_dim)
        self.act = act()

    def forward(self, x: Tensor) -> Tensor:
        return self.lin2(self.act(self.lin1(x)))


class LayerNorm2d(nn.Module):
    def __init__(self, num_channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


# ---- transformer.py ------------------------------------------------------------------------


class TwoWayTransformer(nn.Module):
    def __init__(self, depth: int, embedding_dim: int, num_heads: int, mlp_dim: int, activation=nn.ReLU,
                 attention_downsample_rate: int = 2) -> None:  # fmt: skip
        super().__init__()
        self.layers = nn.ModuleList(
            TwoWayAttentionBlock(embedding_dim, num_heads, mlp_dim, activation, attention_downsample_rate, i == 0)
            for i in range(depth)
        )
        self.final_attn_token_to_image = Attention(embedding_dim, num_heads, downsample_rate=attention_downsample_rate)
        self.norm_final_attn = nn.LayerNorm(embedding_dim)  # PyTorch's default eps, 1e-5

    def forward(self, image_embedding: Tensor, image_pe: Tensor, point_embedding: Tensor) -> tuple[Tensor, Tensor]:
        image_embedding = image_embedding.flatten(2).permute(0, 2, 1)
        image_pe = image_pe.flatten(2).permute(0, 2, 1)
        queries, keys = point_embedding, image_embedding
        for layer in self.layers:
            queries, keys = layer(queries=queries, keys=keys, query_pe=point_embedding, key_pe=image_pe)
        q = queries + point_embedding
        k = keys + image_pe
        attn_out = self.final_attn_token_to_image(q=q, k=k, v=keys)
        queries = self.norm_final_attn(queries + attn_out)
        return queries, keys


class TwoWayAttentionBlock(nn.Module):
    def __init__(self, embedding_dim: int, num_heads: int, mlp_dim: int = 2048, activation=nn.ReLU,
                 attention_downsample_rate: int = 2, skip_first_layer_pe: bool = False) -> None:  # fmt: skip
        super().__init__()
        self.self_attn = Attention(embedding_dim, num_heads)
        self.norm1 = nn.LayerNorm(embedding_dim)
        self.cross_attn_token_to_image = Attention(embedding_dim, num_heads, downsample_rate=attention_downsample_rate)
        self.norm2 = nn.LayerNorm(embedding_dim)
        self.mlp = MLPBlock(embedding_dim, mlp_dim, activation)
        self.norm3 = nn.LayerNorm(embedding_dim)
        self.norm4 = nn.LayerNorm(embedding_dim)
        self.cross_attn_image_to_token = Attention(embedding_dim, num_heads, downsample_rate=attention_downsample_rate)
        self.skip_first_layer_pe = skip_first_layer_pe

    def forward(self, queries: Tensor, keys: Tensor, query_pe: Tensor, key_pe: Tensor) -> tuple[Tensor, Tensor]:
        if self.skip_first_layer_pe:
            queries = self.self_attn(q=queries, k=queries, v=queries)
        else:
            q = queries + query_pe
            queries = queries + self.self_attn(q=q, k=q, v=queries)
        queries = self.norm1(queries)
        q = queries + query_pe
        k = keys + key_pe
        queries = self.norm2(queries + self.cross_attn_token_to_image(q=q, k=k, v=keys))
        queries = self.norm3(queries + self.mlp(queries))
        q = queries + query_pe
        k = keys + key_pe
        keys = self.norm4(keys + self.cross_attn_image_to_token(q=k, k=q, v=queries))
        return queries, keys


class Attention(nn.Module):
    def __init__(self, embedding_dim: int, num_heads: int, downsample_rate: int = 1) -> None:
        super().__init__()
        self.internal_dim = embedding_dim // downsample_rate
        self.num_heads = num_heads
        self.q_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.k_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.v_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.out_proj = nn.Linear(self.internal_dim, embedding_dim)

    def _separate_heads(self, x: Tensor, num_heads: int) -> Tensor:
        b, n, c = x.shape
        return x.reshape(b, n, num_heads, c // num_heads).transpose(1, 2)

    def _recombine_heads(self, x: Tensor) -> Tensor:
        b, n_heads, n_tokens, c_per_head = x.shape
        return x.transpose(1, 2).reshape(b, n_tokens, n_heads * c_per_head)

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        q = self._separate_heads(self.q_proj(q), self.num_heads)
        k = self._separate_heads(self.k_proj(k), self.num_heads)
        v = self._separate_heads(self.v_proj(v), self.num_heads)
        _, _, _, c_per_head = q.shape
        attn = q @ k.permute(0, 1, 3, 2)
        attn = torch.softmax(attn / math.sqrt(c_per_head), dim=-1)
        return self.out_proj(self._recombine_heads(attn @ v))


# ---- prompt_encoder.py ---------------------------------------------------------------------


class PositionEmbeddingRandom(nn.Module):
    def __init__(self, num_pos_feats: int = 64) -> None:
        super().__init__()
        self.register_buffer("positional_encoding_gaussian_matrix", torch.randn((2, num_pos_feats)))

    def _pe_encoding(self, coords: Tensor) -> Tensor:
        coords = 2 * coords - 1
        coords = coords @ self.positional_encoding_gaussian_matrix
        coords = 2 * np.pi * coords
        return torch.cat([torch.sin(coords), torch.cos(coords)], dim=-1)

    def forward(self, size: tuple[int, int]) -> Tensor:
        h, w = size
        grid = torch.ones((h, w), dtype=torch.float32)
        y_embed = (grid.cumsum(dim=0) - 0.5) / h
        x_embed = (grid.cumsum(dim=1) - 0.5) / w
        return self._pe_encoding(torch.stack([x_embed, y_embed], dim=-1)).permute(2, 0, 1)

    def forward_with_coords(self, coords_input: Tensor, image_size: tuple[int, int]) -> Tensor:
        coords = coords_input.clone()
        coords[:, :, 0] = coords[:, :, 0] / image_size[1]
        coords[:, :, 1] = coords[:, :, 1] / image_size[0]
        return self._pe_encoding(coords.to(torch.float))


class PromptEncoder(nn.Module):
    def __init__(self, embed_dim: int, image_embedding_size: tuple[int, int], input_image_size: tuple[int, int],
                 mask_in_chans: int, activation=nn.GELU) -> None:  # fmt: skip
        super().__init__()
        self.embed_dim = embed_dim
        self.input_image_size = input_image_size
        self.image_embedding_size = image_embedding_size
        self.pe_layer = PositionEmbeddingRandom(embed_dim // 2)
        self.point_embeddings = nn.ModuleList([nn.Embedding(1, embed_dim) for _ in range(4)])
        self.not_a_point_embed = nn.Embedding(1, embed_dim)
        self.mask_downscaling = nn.Sequential(  # mask inputs are not used by these tests; kept for the weights
            nn.Conv2d(1, mask_in_chans // 4, kernel_size=2, stride=2),
            LayerNorm2d(mask_in_chans // 4),
            activation(),
            nn.Conv2d(mask_in_chans // 4, mask_in_chans, kernel_size=2, stride=2),
            LayerNorm2d(mask_in_chans),
            activation(),
            nn.Conv2d(mask_in_chans, embed_dim, kernel_size=1),
        )
        self.no_mask_embed = nn.Embedding(1, embed_dim)

    def get_dense_pe(self) -> Tensor:
        return self.pe_layer(self.image_embedding_size).unsqueeze(0)

    def _embed_points(self, points: Tensor, labels: Tensor, pad: bool) -> Tensor:
        points = points + 0.5  # Shift to center of pixel
        if pad:
            padding_point = torch.zeros((points.shape[0], 1, 2), device=points.device)
            padding_label = -torch.ones((labels.shape[0], 1), device=labels.device)
            points = torch.cat([points, padding_point], dim=1)
            labels = torch.cat([labels, padding_label], dim=1)
        point_embedding = self.pe_layer.forward_with_coords(points, self.input_image_size)
        point_embedding[labels == -1] = 0.0
        point_embedding[labels == -1] += self.not_a_point_embed.weight
        point_embedding[labels == 0] += self.point_embeddings[0].weight
        point_embedding[labels == 1] += self.point_embeddings[1].weight
        return point_embedding

    def _embed_boxes(self, boxes: Tensor) -> Tensor:
        boxes = boxes + 0.5  # Shift to center of pixel
        coords = boxes.reshape(-1, 2, 2)
        corner_embedding = self.pe_layer.forward_with_coords(coords, self.input_image_size)
        corner_embedding[:, 0, :] += self.point_embeddings[2].weight
        corner_embedding[:, 1, :] += self.point_embeddings[3].weight
        return corner_embedding

    def forward(self, points: tuple[Tensor, Tensor] | None, boxes: Tensor | None, masks: Tensor | None):
        bs = points[0].shape[0] if points is not None else boxes.shape[0] if boxes is not None else 1
        sparse_embeddings = torch.empty((bs, 0, self.embed_dim))
        if points is not None:
            coords, labels = points
            point_embeddings = self._embed_points(coords, labels, pad=(boxes is None))
            sparse_embeddings = torch.cat([sparse_embeddings, point_embeddings], dim=1)
        if boxes is not None:
            sparse_embeddings = torch.cat([sparse_embeddings, self._embed_boxes(boxes)], dim=1)
        if masks is not None:
            dense_embeddings = self.mask_downscaling(masks)
        else:
            dense_embeddings = self.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(
                bs, -1, self.image_embedding_size[0], self.image_embedding_size[1]
            )
        return sparse_embeddings, dense_embeddings


# ---- mask_decoder.py / mask_decoder_hq.py --------------------------------------------------


class MLP(nn.Module):
    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int,
                 sigmoid_output: bool = False) -> None:  # fmt: skip
        super().__init__()
        self.num_layers = num_layers
        h = [hidden_dim] * (num_layers - 1)
        self.layers = nn.ModuleList(nn.Linear(n, k) for n, k in zip([input_dim] + h, h + [output_dim]))
        self.sigmoid_output = sigmoid_output

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = F.relu(layer(x)) if i < self.num_layers - 1 else layer(x)
        return F.sigmoid(x) if self.sigmoid_output else x


class MaskDecoder(nn.Module):
    """segment-anything's decoder (facebook/sam-*)."""

    def __init__(self, *, transformer_dim: int, transformer: nn.Module, num_multimask_outputs: int = 3,
                 activation=nn.GELU, iou_head_depth: int = 3, iou_head_hidden_dim: int = 256) -> None:  # fmt: skip
        super().__init__()
        self.transformer = transformer
        self.iou_token = nn.Embedding(1, transformer_dim)
        self.num_mask_tokens = num_multimask_outputs + 1
        self.mask_tokens = nn.Embedding(self.num_mask_tokens, transformer_dim)
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose2d(transformer_dim, transformer_dim // 4, kernel_size=2, stride=2),
            LayerNorm2d(transformer_dim // 4),
            activation(),
            nn.ConvTranspose2d(transformer_dim // 4, transformer_dim // 8, kernel_size=2, stride=2),
            activation(),
        )
        self.output_hypernetworks_mlps = nn.ModuleList(
            MLP(transformer_dim, transformer_dim, transformer_dim // 8, 3) for _ in range(self.num_mask_tokens)
        )
        self.iou_prediction_head = MLP(transformer_dim, iou_head_hidden_dim, self.num_mask_tokens, iou_head_depth)

    def forward(self, image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings, multimask_output):
        masks, iou_pred = self.predict_masks(
            image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings
        )
        mask_slice = slice(1, None) if multimask_output else slice(0, 1)
        return masks[:, mask_slice, :, :], iou_pred[:, mask_slice]

    def predict_masks(self, image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings):
        output_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)
        output_tokens = output_tokens.unsqueeze(0).expand(sparse_prompt_embeddings.size(0), -1, -1)
        tokens = torch.cat((output_tokens, sparse_prompt_embeddings), dim=1)
        src = torch.repeat_interleave(image_embeddings, tokens.shape[0], dim=0)
        src = src + dense_prompt_embeddings
        pos_src = torch.repeat_interleave(image_pe, tokens.shape[0], dim=0)
        b, c, h, w = src.shape
        hs, src = self.transformer(src, pos_src, tokens)
        iou_token_out = hs[:, 0, :]
        mask_tokens_out = hs[:, 1 : (1 + self.num_mask_tokens), :]
        src = src.transpose(1, 2).view(b, c, h, w)
        upscaled_embedding = self.output_upscaling(src)
        hyper_in = torch.stack(
            [self.output_hypernetworks_mlps[i](mask_tokens_out[:, i, :]) for i in range(self.num_mask_tokens)], dim=1
        )
        b, c, h, w = upscaled_embedding.shape
        masks = (hyper_in @ upscaled_embedding.view(b, c, h * w)).view(b, -1, h, w)
        return masks, self.iou_prediction_head(iou_token_out)


class MaskDecoderHQ(MaskDecoder):
    """SysCV/sam-hq's decoder: SAM's plus the HQ output token and the HQ feature fusion."""

    def __init__(self, *, transformer_dim: int, vit_dim: int, **kwargs) -> None:
        super().__init__(transformer_dim=transformer_dim, **kwargs)
        self.hf_token = nn.Embedding(1, transformer_dim)
        self.hf_mlp = MLP(transformer_dim, transformer_dim, transformer_dim // 8, 3)
        self.num_mask_tokens = self.num_mask_tokens + 1
        self.compress_vit_feat = nn.Sequential(
            nn.ConvTranspose2d(vit_dim, transformer_dim, kernel_size=2, stride=2),
            LayerNorm2d(transformer_dim),
            nn.GELU(),
            nn.ConvTranspose2d(transformer_dim, transformer_dim // 8, kernel_size=2, stride=2),
        )
        self.embedding_encoder = nn.Sequential(
            nn.ConvTranspose2d(transformer_dim, transformer_dim // 4, kernel_size=2, stride=2),
            LayerNorm2d(transformer_dim // 4),
            nn.GELU(),
            nn.ConvTranspose2d(transformer_dim // 4, transformer_dim // 8, kernel_size=2, stride=2),
        )
        self.embedding_maskfeature = nn.Sequential(
            nn.Conv2d(transformer_dim // 8, transformer_dim // 4, 3, 1, 1),
            LayerNorm2d(transformer_dim // 4),
            nn.GELU(),
            nn.Conv2d(transformer_dim // 4, transformer_dim // 8, 3, 1, 1),
        )

    def forward(self, image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings,
                multimask_output, hq_token_only, interm_embeddings):  # fmt: skip
        masks, iou_pred = self.predict_masks_hq(
            image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings, interm_embeddings
        )
        if multimask_output:
            mask_slice = slice(1, self.num_mask_tokens - 1)
            iou_pred = iou_pred[:, mask_slice]
            iou_pred, max_iou_idx = torch.max(iou_pred, dim=1)
            iou_pred = iou_pred.unsqueeze(1)
            masks_multi = masks[:, mask_slice, :, :]
            masks_sam = masks_multi[torch.arange(masks_multi.size(0)), max_iou_idx].unsqueeze(1)
        else:
            mask_slice = slice(0, 1)
            iou_pred = iou_pred[:, mask_slice]
            masks_sam = masks[:, mask_slice]
        masks_hq = masks[:, slice(self.num_mask_tokens - 1, self.num_mask_tokens)]
        masks = masks_hq if hq_token_only else masks_sam + masks_hq
        return masks, iou_pred

    def predict_masks_hq(self, image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings,
                         interm_embeddings):  # fmt: skip
        """`MaskDecoderHQ.forward`'s HQ features, then `MaskDecoderHQ.predict_masks`: (B, 5, 256, 256), (B, 4)."""
        vit_features = interm_embeddings[0].permute(0, 3, 1, 2)
        hq_features = self.embedding_encoder(image_embeddings) + self.compress_vit_feat(vit_features)
        output_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight, self.hf_token.weight], dim=0)
        output_tokens = output_tokens.unsqueeze(0).expand(sparse_prompt_embeddings.size(0), -1, -1)
        tokens = torch.cat((output_tokens, sparse_prompt_embeddings), dim=1)
        src = torch.repeat_interleave(image_embeddings, tokens.shape[0], dim=0)
        src = src + dense_prompt_embeddings
        pos_src = torch.repeat_interleave(image_pe, tokens.shape[0], dim=0)
        b, c, h, w = src.shape
        hs, src = self.transformer(src, pos_src, tokens)
        iou_token_out = hs[:, 0, :]
        mask_tokens_out = hs[:, 1 : (1 + self.num_mask_tokens), :]
        src = src.transpose(1, 2).view(b, c, h, w)  # the REFINED embedding is upscaled
        upscaled_embedding_sam = self.output_upscaling(src)
        upscaled_embedding_hq = self.embedding_maskfeature(upscaled_embedding_sam) + hq_features.repeat(b, 1, 1, 1)
        hyper_in_list = []
        for i in range(self.num_mask_tokens):
            if i < self.num_mask_tokens - 1:
                hyper_in_list.append(self.output_hypernetworks_mlps[i](mask_tokens_out[:, i, :]))
            else:
                hyper_in_list.append(self.hf_mlp(mask_tokens_out[:, i, :]))
        hyper_in = torch.stack(hyper_in_list, dim=1)
        b, c, h, w = upscaled_embedding_sam.shape
        masks_sam = (hyper_in[:, : self.num_mask_tokens - 1] @ upscaled_embedding_sam.view(b, c, h * w)).view(
            b, -1, h, w
        )
        masks_sam_hq = (hyper_in[:, self.num_mask_tokens - 1 :] @ upscaled_embedding_hq.view(b, c, h * w)).view(
            b, -1, h, w
        )
        masks = torch.cat([masks_sam, masks_sam_hq], dim=1)
        return masks, self.iou_prediction_head(iou_token_out)


# ---- utils/transforms.py, sam.py -----------------------------------------------------------


def get_preprocess_shape(oldh: int, oldw: int, long_side_length: int) -> tuple[int, int]:
    scale = long_side_length * 1.0 / max(oldh, oldw)
    newh, neww = oldh * scale, oldw * scale
    return int(newh + 0.5), int(neww + 0.5)


def apply_coords(coords: np.ndarray, original_size: tuple[int, int], target_length: int = 1024) -> np.ndarray:
    old_h, old_w = original_size
    new_h, new_w = get_preprocess_shape(original_size[0], original_size[1], target_length)
    coords = np.array(coords, dtype=float, copy=True)
    coords[..., 0] = coords[..., 0] * (new_w / old_w)
    coords[..., 1] = coords[..., 1] * (new_h / old_h)
    return coords


def apply_boxes(boxes: np.ndarray, original_size: tuple[int, int], target_length: int = 1024) -> np.ndarray:
    return apply_coords(np.asarray(boxes).reshape(-1, 2, 2), original_size, target_length).reshape(-1, 4)


def postprocess_masks(masks: Tensor, input_size: tuple[int, int], original_size: tuple[int, int], img_size=1024):
    masks = F.interpolate(masks, (img_size, img_size), mode="bilinear", align_corners=False)
    masks = masks[..., : input_size[0], : input_size[1]]
    return F.interpolate(masks, original_size, mode="bilinear", align_corners=False)


# ---- weights: our Hugging Face checkpoints under the official names ------------------------


def _rename(key: str) -> str | None:
    """A transformers SamModel / SamHQModel key → the official key (None: not part of the ported path)."""
    if key.startswith("vision_encoder.") or key.startswith("prompt_encoder.shared_embedding."):
        return None  # the ViT is not ported; the shared positional embedding is read once, below
    if key == "shared_image_embedding.positional_embedding":
        return "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"
    replacements = [
        ("prompt_encoder.point_embed.", "prompt_encoder.point_embeddings."),
        ("prompt_encoder.mask_embed.conv1.", "prompt_encoder.mask_downscaling.0."),
        ("prompt_encoder.mask_embed.layer_norm1.", "prompt_encoder.mask_downscaling.1."),
        ("prompt_encoder.mask_embed.conv2.", "prompt_encoder.mask_downscaling.3."),
        ("prompt_encoder.mask_embed.layer_norm2.", "prompt_encoder.mask_downscaling.4."),
        ("prompt_encoder.mask_embed.conv3.", "prompt_encoder.mask_downscaling.6."),
        ("mask_decoder.hq_token.", "mask_decoder.hf_token."),
        ("mask_decoder.hq_mask_mlp.", "mask_decoder.hf_mlp."),
        ("mask_decoder.upscale_conv1.", "mask_decoder.output_upscaling.0."),
        ("mask_decoder.upscale_layer_norm.", "mask_decoder.output_upscaling.1."),
        ("mask_decoder.upscale_conv2.", "mask_decoder.output_upscaling.3."),
        ("mask_decoder.compress_vit_conv1.", "mask_decoder.compress_vit_feat.0."),
        ("mask_decoder.compress_vit_norm.", "mask_decoder.compress_vit_feat.1."),
        ("mask_decoder.compress_vit_conv2.", "mask_decoder.compress_vit_feat.3."),
        ("mask_decoder.encoder_conv1.", "mask_decoder.embedding_encoder.0."),
        ("mask_decoder.encoder_norm.", "mask_decoder.embedding_encoder.1."),
        ("mask_decoder.encoder_conv2.", "mask_decoder.embedding_encoder.3."),
        ("mask_decoder.mask_conv1.", "mask_decoder.embedding_maskfeature.0."),
        ("mask_decoder.mask_norm.", "mask_decoder.embedding_maskfeature.1."),
        ("mask_decoder.mask_conv2.", "mask_decoder.embedding_maskfeature.3."),
        ("mask_decoder.transformer.layer_norm_final_attn.", "mask_decoder.transformer.norm_final_attn."),
    ]
    for old, new in replacements:
        if key.startswith(old):
            return new + key[len(old) :]
    for i in range(1, 5):
        key = key.replace(f".layer_norm{i}.", f".norm{i}.")
    return key  # MLP heads are renumbered in official_state_dict


def official_state_dict(model) -> dict[str, Tensor]:
    """The checkpoint's weights under the official names."""
    state = {}
    for key, value in model.state_dict().items():
        new = _rename(key)
        if new is None:
            continue
        # transformers' MLP heads: proj_in, layers.k, proj_out → official layers.0, layers.k+1, layers.last
        if ".proj_in." in new or ".proj_out." in new or (".layers." in new and "transformer." not in new):
            head, _, leaf = new.rpartition(".")  # e.g. mask_decoder.iou_prediction_head.proj_in, weight
            prefix, _, part = head.rpartition(".")
            if part == "proj_in":
                new = f"{prefix}.layers.0.{leaf}"
            elif part == "proj_out":
                depth = _mlp_depth(model, key)
                new = f"{prefix}.layers.{depth - 1}.{leaf}"
            else:  # prefix = ...head.layers, part = k
                module, _, _ = prefix.rpartition(".")
                new = f"{module}.layers.{int(part) + 1}.{leaf}"
        state[new] = value.detach().clone().float()
    return state


def _mlp_depth(model, key: str) -> int:
    module = model.get_submodule(key.rsplit(".", 2)[0])
    return len(module.layers) + 2


class OfficialSam(nn.Module):
    """The official prompt encoder + mask decoder (HQ or plain), sized from a transformers config."""

    def __init__(self, config, hq: bool):
        super().__init__()
        decoder = config.mask_decoder_config
        prompt = config.prompt_encoder_config
        vision = config.vision_config
        dim = decoder.hidden_size
        grid = prompt.image_embedding_size
        self.prompt_encoder = PromptEncoder(
            embed_dim=dim,
            image_embedding_size=(grid, grid),
            input_image_size=(prompt.image_size, prompt.image_size),
            mask_in_chans=prompt.mask_input_channels,
        )
        transformer = TwoWayTransformer(
            depth=decoder.num_hidden_layers,
            embedding_dim=dim,
            num_heads=decoder.num_attention_heads,
            mlp_dim=decoder.mlp_dim,
            attention_downsample_rate=decoder.attention_downsample_rate,
        )
        kwargs = dict(
            transformer_dim=dim,
            transformer=transformer,
            num_multimask_outputs=decoder.num_multimask_outputs,
            iou_head_depth=decoder.iou_head_depth,
            iou_head_hidden_dim=decoder.iou_head_hidden_dim,
        )
        self.mask_decoder = MaskDecoderHQ(vit_dim=vision.hidden_size, **kwargs) if hq else MaskDecoder(**kwargs)
        self.img_size = prompt.image_size
        self.hq = hq


class OfficialPredictor:
    """`SamPredictor` (set_image / predict) over the ported prompt encoder and decoder.

    Built from a transformers SamHQModel / SamModel: its weights are copied under the official
    names; its vision encoder (not ported) gives the image embedding and the ViT features.
    """

    def __init__(self, hf_model, processor):
        self.hf_model = hf_model
        self.processor = processor
        hq = hasattr(hf_model.mask_decoder, "hq_token")
        self.model = OfficialSam(hf_model.config, hq).eval()
        self.model.load_state_dict(official_state_dict(hf_model), strict=True)
        self.features = self.interm_features = None

    @torch.no_grad()
    def set_image(self, rgb: np.ndarray) -> None:
        pixel_values = self.processor.image_processor(images=rgb, return_tensors="pt")["pixel_values"]
        output = self.hf_model.vision_encoder(pixel_values=pixel_values.float())
        self.features = output.last_hidden_state.float()
        interm = getattr(output, "intermediate_embeddings", None)
        self.interm_features = [t.float() for t in interm] if interm else None
        self.original_size = tuple(rgb.shape[:2])
        self.input_size = get_preprocess_shape(*self.original_size, self.model.img_size)

    def _embed(self, point_coords, point_labels, box):
        coords_torch = labels_torch = box_torch = None
        if point_coords is not None:
            point_coords = apply_coords(np.asarray(point_coords, dtype=float), self.original_size, self.model.img_size)
            coords_torch = torch.as_tensor(point_coords, dtype=torch.float)[None, :, :]
            labels_torch = torch.as_tensor(np.asarray(point_labels), dtype=torch.int)[None, :]
        if box is not None:
            box = apply_boxes(np.asarray(box, dtype=float), self.original_size, self.model.img_size)
            box_torch = torch.as_tensor(box, dtype=torch.float)[None, :]
        points = (coords_torch, labels_torch) if coords_torch is not None else None
        return self.model.prompt_encoder(points=points, boxes=box_torch, masks=None)

    @torch.no_grad()
    def predict(self, point_coords=None, point_labels=None, box=None, multimask_output=True, hq_token_only=False):
        """`SamPredictor.predict(..., return_logits=True)`: (masks C×H×W logits, iou (C,), low-res C×256×256)."""
        sparse, dense = self._embed(point_coords, point_labels, box)
        decoder = self.model.mask_decoder
        image_pe = self.model.prompt_encoder.get_dense_pe()
        if self.model.hq:
            low_res, iou = decoder(self.features, image_pe, sparse, dense, multimask_output, hq_token_only,
                                   self.interm_features)  # fmt: skip
        else:
            low_res, iou = decoder(self.features, image_pe, sparse, dense, multimask_output)
        masks = postprocess_masks(low_res, self.input_size, self.original_size, self.model.img_size)
        return masks[0].numpy(), iou[0].numpy(), low_res[0].numpy()

    @torch.no_grad()
    def ranked(self, point_coords=None, point_labels=None, box=None, multimask_output=True, hq_token_only=False):
        """Every candidate, best predicted IoU first: (logits K×H×W, scores (K,)).

        Official `predict` already returns the answer for a single-mask prompt, for plain SAM's
        three masks (sorted here), and for SAM-HQ's best multimask mask; SAM-HQ's second and third
        multimask candidates (which the official forward drops) are built from the official
        `predict_masks` output with the official combination (SAM mask + HQ mask).
        """
        masks, iou, _ = self.predict(point_coords, point_labels, box, multimask_output, hq_token_only)
        if not (self.model.hq and multimask_output and not hq_token_only):
            order = np.argsort(-iou, kind="stable")
            return masks[order], iou[order]
        sparse, dense = self._embed(point_coords, point_labels, box)
        decoder = self.model.mask_decoder
        raw, raw_iou = decoder.predict_masks_hq(
            self.features, self.model.prompt_encoder.get_dense_pe(), sparse, dense, self.interm_features
        )
        multi_iou = raw_iou[0, 1:4]
        order = torch.argsort(multi_iou, descending=True, stable=True)
        combined = raw[:, 1:4][:, order] + raw[:, 4:5]
        upscaled = postprocess_masks(combined, self.input_size, self.original_size, self.model.img_size)[0].numpy()
        # the same official computation on two paths: equal to float32 rounding, signs but for the rounding band
        np.testing.assert_allclose(upscaled[0], masks[0], atol=1e-4 * max(1.0, float(np.abs(masks[0]).max())), rtol=0)
        assert_signs_agree(upscaled[0], masks[0], band=1e-4 * max(1.0, float(np.abs(masks[0]).max())))
        assert math.isclose(float(multi_iou[order[0]]), float(iou[0]), rel_tol=1e-5)
        return upscaled, multi_iou[order].numpy()


def predict_object(predictor: OfficialPredictor, points, labels, box=None, hq_token_only=False):
    """One object as our policy asks official SAM-HQ for it: multimask for exactly one point and no
    box; ranked candidates (logits at the picture's size, scores)."""
    points = [list(map(float, p)) for p in points]
    multimask = len(points) == 1 and box is None
    return predictor.ranked(
        np.array(points, dtype=float).reshape(-1, 2) if points else None,
        np.array(labels, dtype=int) if points else None,
        np.array(box, dtype=float) if box is not None else None,
        multimask_output=multimask,
        hq_token_only=hq_token_only,
    )
