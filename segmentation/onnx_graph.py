"""Our decoder path as ONNX graphs: one for the server's ONNX Runtime session, one for the browser.

Both graphs are exported with torch's exporter from small wrapper modules that call *our* decode
(`decoder.decode_tokens` / `decode_masks`: the official SAM-HQ decode the tests check against the
official code), never transformers' forward. The prompt goes in as Meta's SAM ONNX export takes it:
coordinates (N, T, 2) in the model's 1024 frame with a float label per token, 1 include, 0 exclude,
2 / 3 a box's top-left / bottom-right corner, -1 "not a point" (the pad official SAM appends when
there is no box). One graph then serves every layout (points, box, both) and any number of tokens;
`meta_prompt` turns our points/labels/boxes into that form, and `PromptTokens` embeds it to exactly
what `decoder.sparse_tokens` gives for the same prompt.

* The server graph (`ServerDecoder`) takes the cached `PictureFeatures` as they are (including the
  first layer's picture-only projections) and returns what `DecoderOutput` holds, so ranking and
  composing stay shared with the torch path.
* The browser graphs (`export_browser_decoder`): a small picture graph (`BrowserPicture`) that the page runs once
  per picture on the image tokens it fetched, giving the first layer's projections and the positional grid, and
  the decoder graph (`BrowserDecoder`) that takes those, the tokens and HQ features, runs per hover and returns
  the candidate the engine would rank first for one object, with its score.

    python -m segmentation.onnx_graph --model syscv-community/sam-hq-vit-base [--out PATH] [--browser]

writes the server graph where the server looks for it (HF_HOME/samhq-onnx/, see onnx_decoder), or to
PATH; `--browser` the browser graphs (default NAME-browser-decoder.onnx and, beside it, its -picture.onnx).

The export tools (onnx, onnxscript) are optional: requirements-onnx.txt. Running a graph needs only
onnxruntime (requirements.txt).
"""

from __future__ import annotations

import argparse
import copy
import logging
import math
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import decoder as dec

log = logging.getLogger(__name__)

OPSET = 17  # LayerNormalization's first opset; onnxruntime-web runs it
# The browser graphs' interface (inputs, outputs, files): part of their cached file names, so a server never serves
# a graph of an older interface to the page's current worker. 2: the picture graph beside the decoder graph.
BROWSER_GRAPHS_VERSION = 2
# Labels of Meta's ONNX prompt convention.
NOT_A_POINT, EXCLUDE, INCLUDE, BOX_TOP_LEFT, BOX_BOTTOM_RIGHT = -1.0, 0.0, 1.0, 2.0, 3.0


def meta_prompt(
    points: np.ndarray | None, labels: np.ndarray | None, boxes: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """Points (N, P, 2) with labels (N, P) and/or boxes (N, 4), in the 1024 frame, as (coords (N, T, 2),
    labels (N, T)) float32 in Meta's convention: the points, then the box's corners (labels 2, 3), or one
    "not a point" pad token when there is no box, as official SAM's prompt encoder lays them out."""
    if points is None and boxes is None:
        raise ValueError("a prompt needs points, boxes or both")
    n = (points if points is not None else boxes).shape[0]
    coords, kinds = [], []
    if points is not None:
        coords.append(np.asarray(points, dtype=np.float32).reshape(n, -1, 2))
        kinds.append(np.asarray(labels, dtype=np.float32).reshape(n, -1))
    if boxes is not None:
        coords.append(np.asarray(boxes, dtype=np.float32).reshape(n, 2, 2))
        kinds.append(np.tile(np.array([BOX_TOP_LEFT, BOX_BOTTOM_RIGHT], dtype=np.float32), (n, 1)))
    else:
        coords.append(np.zeros((n, 1, 2), dtype=np.float32))
        kinds.append(np.full((n, 1), NOT_A_POINT, dtype=np.float32))
    return np.concatenate(coords, axis=1), np.concatenate(kinds, axis=1)


class PromptTokens(nn.Module):
    """The prompt encoder's sparse tokens from Meta-style (coords, labels): the same arithmetic, in the same
    order, as transformers' `SamHQPromptEncoder._embed_points` / `_embed_boxes` (shift to the pixel centre,
    random Fourier features, then the label's learned embedding; "not a point" replaces the features)."""

    def __init__(self, model):
        super().__init__()
        encoder = model.prompt_encoder
        self.input_size = float(encoder.input_image_size)
        self.gaussian = encoder.shared_embedding.positional_embedding  # (2, C/2)
        self.not_a_point = encoder.not_a_point_embed.weight  # (1, C)
        self.label_embeddings = nn.ParameterList([embed.weight for embed in encoder.point_embed])  # 4 × (1, C)

    def forward(self, coords: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """coords (N, T, 2), labels (N, T) float → sparse tokens (1, N, T, C)."""
        coords = (coords + 0.5) / self.input_size  # x / width, y / height: the frame is square
        coords = 2 * coords - 1
        features = coords.to(self.gaussian.dtype) @ self.gaussian
        features = 2 * math.pi * features
        tokens = torch.cat([torch.sin(features), torch.cos(features)], dim=-1)
        labels = labels[..., None]
        tokens = torch.where(labels == NOT_A_POINT, self.not_a_point, tokens)
        for value, embedding in enumerate(self.label_embeddings):
            tokens = torch.where(labels == float(value), tokens + embedding, tokens)
        return tokens.unsqueeze(0)


def _call(function, *args):
    """A decoder function without its `torch.inference_mode` wrapper: the exporter traces plain autograd-free code."""
    return getattr(function, "__wrapped__", function)(*args)


def hq_masks_folded(decoder, upscaled: torch.Tensor, hq_features: torch.Tensor, hq_hyper: torch.Tensor) -> torch.Tensor:
    """SAM-HQ's HQ mask, `hq_hyper · (mask_conv2(gelu(mask_norm(mask_conv1(upscaled)))) + hq_features)`, with the
    object's hypernetwork vector folded into `mask_conv2` first: the same sum in another order, so one 3×3
    convolution to a single channel per object instead of 64 → 32 channels at 4H × 4W (the decode's largest
    convolution), and no 32-channel mask features at all. Done as a (pixels × 64) · (64 × 9 taps) product in
    channels-last, then the 9 taps' shifted sums: no layout change back after the norm. For the graphs only: the
    torch decode keeps the reference's order (docs/PERFORMANCE.md: folding there flipped one near-zero pixel
    against the official code), while a graph is held to the torch decode within 1e-4 and identical label maps.

    upscaled (N, C/8, S, S), hq_features (1, C/8, S, S), hq_hyper (N, C/8) → (N, 1, S, S)."""
    n_objects, _, height, width = upscaled.shape
    norm, conv2 = decoder.mask_norm, decoder.mask_conv2
    features = decoder.mask_conv1(upscaled).permute(0, 2, 3, 1)  # (N, S, S, C/4)
    features = decoder.activation(F.layer_norm(features, norm.normalized_shape, norm.weight, norm.bias, norm.eps))
    channels = features.shape[-1]
    folded = (hq_hyper @ conv2.weight.reshape(conv2.weight.shape[0], -1)).reshape(n_objects, channels, 9)
    # the 9 taps' planes (N, 9, S, S), each a contiguous picture for the shifted sums below
    taps = (features.reshape(n_objects, height * width, channels) @ folded).transpose(1, 2)
    taps = taps.reshape(n_objects, 9, height, width)
    taps = F.pad(taps, (1, 1, 1, 1))  # zero padding 1, as the convolution's
    mask = taps[:, 0, 0:height, 0:width]
    for tap in range(1, 9):
        dy, dx = divmod(tap, 3)
        mask = mask + taps[:, tap, dy : dy + height, dx : dx + width]
    constant = hq_hyper @ conv2.bias  # (N,)
    picture_part = (hq_hyper @ hq_features.reshape(hq_features.shape[1], height * width)).reshape(
        n_objects, height, width
    )
    return (mask + constant[:, None, None] + picture_part).unsqueeze(1)


def upscaled_channels_last(decoder, keys: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """The decoder's output upscaling (two 2×2 stride-2 transposed convolutions with a norm and GELUs) of the
    refined image tokens (N, 1, H*W, C), as (N, 4H*4W, C/8) in channels-last pixel order. A stride-2 2×2
    transposed convolution writes each input pixel's 2×2 block from that pixel alone, so each one is a
    (pixels × C_in) · (C_in × 4·C_out) product; the norm then runs over the last axis, with no layout change
    (the runtime's transposed convolutions and the norm's two transposes were ~15 % of the graph)."""
    act = decoder.activation
    conv1, norm, conv2 = decoder.upscale_conv1, decoder.upscale_layer_norm, decoder.upscale_conv2
    c1, c2 = conv1.out_channels, conv2.out_channels
    n_objects = keys.shape[0]
    height, width = grid
    w1 = conv1.weight.permute(0, 2, 3, 1).reshape(conv1.in_channels, 4 * c1)  # columns (i, j, c1)
    x = keys[:, 0] @ w1 + conv1.bias.repeat(4)  # (N, H*W, 4*c1): pixel (2h+i, 2w+j)
    x = act(F.layer_norm(x.reshape(n_objects, height * width * 4, c1), (c1,), norm.weight, norm.bias, norm.eps))
    w2 = conv2.weight.permute(0, 2, 3, 1).reshape(c1, 4 * c2)  # columns (k, l, c2)
    y = act(x @ w2 + conv2.bias.repeat(4))  # (N, H*W*4, 4*c2): (h, w, i, j, k, l, c2), pixel (4h+2i+k, 4w+2j+l)
    y = y.reshape(n_objects, height, width, 2, 2, 2, 2, c2).permute(0, 1, 3, 5, 2, 4, 6, 7)
    return y.reshape(n_objects, 16 * height * width, c2)


def hypernetwork_vectors(decoder, queries: torch.Tensor, hq: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(SAM's mask tokens' vectors (N, 4, C/8), the HQ token's (N, C/8) if `hq` else None) from the queries."""
    mask_tokens = queries[0, :, 1:, :]
    n_sam = len(decoder.output_hypernetworks_mlps)
    hyper = torch.stack([decoder.output_hypernetworks_mlps[i](mask_tokens[:, i, :]) for i in range(n_sam)], dim=1)
    hq_vector = decoder.hq_mask_mlp(mask_tokens[:, n_sam, :]) if hq else None
    return hyper, hq_vector


def decode_masks_folded(model, picture: dec.PictureFeatures, queries: torch.Tensor, keys: torch.Tensor):
    """`decoder.decode_masks` for the graphs: the upscaling channels-last (`upscaled_channels_last`) and the HQ
    mask by `hq_masks_folded`; the same sums in another order (within 1e-5 of the torch decode's logits)."""
    decoder = model.mask_decoder
    n_objects = keys.shape[0]
    size = (4 * picture.grid[0], 4 * picture.grid[1])
    upscaled = upscaled_channels_last(decoder, keys, picture.grid)  # (N, S*S, C/8)
    hyper, hq_hyper = hypernetwork_vectors(decoder, queries, hq=picture.hq_features is not None)
    sam_masks = (upscaled @ hyper.transpose(1, 2)).transpose(1, 2).reshape(n_objects, hyper.shape[1], *size)
    hq_masks = None
    if picture.hq_features is not None:
        # a 4-d NHWC → NCHW permutation: the runtime folds it into the convolution's own layout change
        channels_first = upscaled.reshape(n_objects, *size, upscaled.shape[-1]).permute(0, 3, 1, 2)
        hq_masks = hq_masks_folded(decoder, channels_first, picture.hq_features, hq_hyper)
    iou = decoder.iou_prediction_head(queries[0, :, 0, :])
    return dec.DecoderOutput(sam_masks=sam_masks, hq_masks=hq_masks, iou=iou)


class ServerDecoder(nn.Module):
    """Cached picture features + Meta-style prompts of N objects → (sam_masks, iou[, hq_masks]) of `DecoderOutput`."""

    def __init__(self, model, grid: tuple[int, int]):
        super().__init__()
        self.model = model
        self.prompt = PromptTokens(model)
        self.grid = grid
        self.register_buffer("positions", dec.positional_tokens(model).clone(), persistent=False)

    def forward(self, tokens, keys, values, queries, coords, labels, hq_features=None):
        picture = dec.PictureFeatures(tokens, keys, values, queries, self.grid, hq_features)
        sparse = self.prompt(coords, labels)
        q, k = _call(dec.decode_tokens, self.model, picture, self.positions, sparse)
        output = decode_masks_folded(self.model, picture, q, k)
        if output.hq_masks is None:
            return output.sam_masks, output.iou
        return output.sam_masks, output.iou, output.hq_masks


def picture_projections(model, tokens: torch.Tensor, positions: torch.Tensor):
    """The first two-way layer's picture-only projections, as `decoder.picture_features` computes them."""
    first = model.mask_decoder.transformer.layers[0]
    with_positions = tokens + positions
    return (
        first.cross_attn_token_to_image.k_proj(with_positions),
        first.cross_attn_token_to_image.v_proj(tokens),
        first.cross_attn_image_to_token.q_proj(with_positions),
    )


def first_ranked(output: dec.DecoderOutput, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The candidate `decoder.rank_candidates` puts first (hq_token_only False) for each object, and its score.
    An object is ambiguous when it has exactly one point (include or exclude) and no box (`ObjectPrompt.ambiguous`)."""
    is_point = (labels == INCLUDE) | (labels == EXCLUDE)
    has_box = (labels == BOX_TOP_LEFT).any(dim=1)
    ambiguous = (is_point.sum(dim=1) == 1) & ~has_box  # (N,)
    multi_iou = output.iou[:, 1:4]
    best = torch.argmax(multi_iou, dim=1)  # (N,)
    n, _, h, w = output.sam_masks.shape
    multi_mask = torch.gather(output.sam_masks[:, 1:4], 1, best[:, None, None, None].expand(n, 1, h, w))
    multi_score = torch.gather(multi_iou, 1, best[:, None])
    mask = torch.where(ambiguous[:, None, None, None], multi_mask, output.sam_masks[:, 0:1])
    score = torch.where(ambiguous[:, None], multi_score, output.iou[:, 0:1])
    if output.hq_masks is not None:
        mask = mask + output.hq_masks
    return mask, score[:, 0]


def first_sam_candidate(model, queries: torch.Tensor, keys: torch.Tensor, grid: tuple[int, int], labels: torch.Tensor):
    """`first_ranked` of SAM's own tokens only (no HQ mask): the token is chosen by the same rule on the predicted
    IoUs *before* any mask is made, so only its mask is computed (one hypernetwork product, not four), and the
    HQ mask features (two 3×3 convolutions at 4H × 4W, the costliest part of the HQ decode) are never needed.
    Each step is `decode_masks_folded`'s arithmetic for that token."""
    decoder = model.mask_decoder
    is_point = (labels == INCLUDE) | (labels == EXCLUDE)
    ambiguous = (is_point.sum(dim=1) == 1) & ~(labels == BOX_TOP_LEFT).any(dim=1)  # (N,)
    iou = decoder.iou_prediction_head(queries[0, :, 0, :])  # (N, 4)
    chosen = torch.where(ambiguous, torch.argmax(iou[:, 1:4], dim=1) + 1, torch.zeros_like(ambiguous, dtype=torch.long))
    score = torch.gather(iou, 1, chosen[:, None])[:, 0]
    hyper, _ = hypernetwork_vectors(decoder, queries, hq=False)
    hyper = torch.gather(hyper, 1, chosen[:, None, None].expand(-1, 1, hyper.shape[-1]))  # (N, 1, C/8)
    upscaled = upscaled_channels_last(decoder, keys, grid)  # (N, S*S, C/8)
    mask = (upscaled @ hyper.transpose(1, 2)).reshape(keys.shape[0], 1, 4 * grid[0], 4 * grid[1])
    return mask, score


class BrowserPicture(nn.Module):
    """tokens (1, 1, H*W, C) → keys, values, queries (1, 1, H*W, C/2) and positions (1, 1, H*W, C): what the
    browser decoder graph takes of a picture beyond its tokens, run once per picture in the page's worker (the
    first two-way layer's picture-only projections, `picture_projections`, as the server caches them in
    `PictureFeatures`). The positional grid depends on the weights alone; it is this graph's output so that the
    page downloads it once (in this graph) and the decoder graph takes it as an input instead of holding a copy."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        # a parameter, not a buffer: the exporter inlines a buffer as a Constant at each use
        self.positions = nn.Parameter(dec.positional_tokens(model).clone(), requires_grad=False)

    def forward(self, tokens):
        keys, values, queries = picture_projections(self.model, tokens, self.positions)
        return keys, values, queries, self.positions


class BrowserDecoder(nn.Module):
    """tokens (1, 1, H*W, C), keys, values, queries (1, 1, H*W, C/2) and positions (1, 1, H*W, C) from
    `BrowserPicture`, [hq_features (1, C/8, 4H, 4W)], point_coords (1, P, 2), point_labels (1, P) →
    low_res_logits (1, 1, 4H, 4W) of the first-ranked candidate, score (1,).

    `sam_only`: the first-ranked candidate of SAM's own tokens, without the HQ mask (no `hq_features` input). The
    HQ token still takes part in the two-way transformer, as in the server's decode, so SAM's tokens (and their
    masks) are the server's; only the HQ mask, which the server adds to the chosen one, is left out."""

    def __init__(self, model, grid: tuple[int, int], sam_only: bool = False):
        super().__init__()
        self.model = model
        self.prompt = PromptTokens(model)
        self.grid = grid
        self.sam_only = sam_only

    def forward(self, tokens, keys, values, queries, positions, point_coords, point_labels, hq_features=None):
        if self.sam_only and dec.is_hq(self.model):
            hq_features = tokens  # only a marker: `decode_tokens` then adds the HQ token; its value is never read
        picture = dec.PictureFeatures(tokens, keys, values, queries, self.grid, hq_features)
        sparse = self.prompt(point_coords, point_labels)
        q, k = _call(dec.decode_tokens, self.model, picture, positions, sparse)
        if self.sam_only:
            return first_sam_candidate(self.model, q, k, self.grid, point_labels)
        output = decode_masks_folded(self.model, picture, q, k)
        return first_ranked(output, point_labels)


def _float32_cpu(model):
    """The model itself when it is float32 on the CPU (the export's precision), else a float32 CPU copy:
    the served model is never changed."""
    parameter = next(model.parameters())
    if parameter.dtype == torch.float32 and parameter.device.type == "cpu":
        return model
    return copy.deepcopy(model).to("cpu", torch.float32)


def _grid(model) -> tuple[int, int]:
    size = model.prompt_encoder.image_embedding_size
    return int(size[0]), int(size[1])


def _example_picture(model, grid: tuple[int, int]) -> dict[str, torch.Tensor]:
    """Picture-shaped example inputs (random: only their shapes and dtypes matter to the export)."""
    width = model.mask_decoder.transformer.layers[0].cross_attn_token_to_image.k_proj.in_features
    internal = model.mask_decoder.transformer.layers[0].cross_attn_token_to_image.k_proj.out_features
    h, w = grid
    generator = torch.Generator().manual_seed(0)
    picture = {
        "tokens": torch.randn(1, 1, h * w, width, generator=generator),
        "keys": torch.randn(1, 1, h * w, internal, generator=generator),
        "values": torch.randn(1, 1, h * w, internal, generator=generator),
        "queries": torch.randn(1, 1, h * w, internal, generator=generator),
    }
    if dec.is_hq(model):
        picture["hq_features"] = torch.randn(1, width // 8, 4 * h, 4 * w, generator=generator)
    return picture


def _export(module: nn.Module, args: tuple, names: list[str], outputs: list[str], dynamic: dict, path: Path) -> Path:
    """torch.onnx.export with the weights inlined in one file. `dynamic`: {input: {axis: name}}.

    TorchScript-based export first (`dynamo=False`), the dynamo exporter where that is gone: measured here
    on the ViT-B decoder, the TorchScript path exports in 12 s against 47 s (a server start pays it once
    per model and weights, CI once per session) and its graph ran ~10 % faster in ONNX Runtime; both
    graphs match the torch decode to ~1e-5 (docs/PERFORMANCE.md)."""
    try:
        import onnx  # noqa: F401
    except ImportError as error:
        raise RuntimeError(
            f"exporting the decoder to ONNX needs the export tools: pip install -r requirements-onnx.txt ({error})"
        ) from error
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    module = module.eval()
    with torch.no_grad(), warnings.catch_warnings(), _quiet_exporter():
        warnings.simplefilter("ignore")
        try:
            _export_torchscript(module, args, names, outputs, dynamic, path)
        except Exception as error:  # the legacy exporter is deprecated: removed, or failing on a newer torch
            log.info("TorchScript-based ONNX export failed (%s); using the dynamo exporter", error)
            _export_dynamo(module, args, names, outputs, dynamic, path)
    return path


def _export_torchscript(module, args, names, outputs, dynamic, path: Path) -> None:
    torch.onnx.export(
        module,
        args,
        str(path),
        dynamo=False,
        input_names=names,
        output_names=outputs,
        dynamic_axes=dynamic,
        opset_version=OPSET,
        do_constant_folding=True,
    )


def _export_dynamo(module, args, names, outputs, dynamic, path: Path) -> None:
    try:
        import onnxscript  # noqa: F401
    except ImportError as error:
        raise RuntimeError(
            f"exporting the decoder to ONNX needs the export tools: pip install -r requirements-onnx.txt ({error})"
        ) from error
    dims: dict[str, torch.export.Dim] = {}
    shapes = {
        name: {axis: dims.setdefault(dim, torch.export.Dim(dim, min=1)) for axis, dim in dynamic[name].items()}
        if name in dynamic
        else None
        for name in names
    }
    program = torch.onnx.export(
        module,
        args,
        dynamo=True,
        input_names=names,
        output_names=outputs,
        dynamic_shapes=shapes,
        opset_version=max(OPSET, 18),  # the dynamo exporter's lowest
        external_data=False,
        optimize=True,
        verbose=False,
    )
    program.save(str(path), external_data=False)


class _quiet_exporter:
    """The exporter logs every step at INFO and prints progress; a server start needs none of it."""

    def __enter__(self):
        self._levels = {}
        for name in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript"):
            logger = logging.getLogger(name)
            self._levels[name] = logger.level
            logger.setLevel(logging.ERROR)
        return self

    def __exit__(self, *exc):
        for name, level in self._levels.items():
            logging.getLogger(name).setLevel(level)
        return False


def export_server_decoder(model, path: Path) -> Path:
    """Write the server graph of `model` (float32, on the CPU) to `path`. Inputs: tokens, keys, values,
    queries (1, 1, H*W, ·) and hq_features (SAM-HQ) as `PictureFeatures` holds them; coords (N, T, 2) and
    labels (N, T) from `meta_prompt`, N and T dynamic. Outputs: sam_masks (N, 4, 4H, 4W), iou (N, 4) and
    hq_masks (N, 1, 4H, 4W) (SAM-HQ)."""
    grid = _grid(model)
    picture = _example_picture(model, grid)
    coords, labels = meta_prompt(np.array([[[10.0, 20.0], [300.0, 400.0]]] * 2), np.ones((2, 2)), None)
    hq = "hq_features" in picture
    names = ["tokens", "keys", "values", "queries", "coords", "labels"] + (["hq_features"] if hq else [])
    args = tuple(picture[n] for n in names[:4]) + (torch.from_numpy(coords), torch.from_numpy(labels))
    args += (picture["hq_features"],) if hq else ()
    dynamic = {"coords": {0: "objects", 1: "prompt_tokens"}, "labels": {0: "objects", 1: "prompt_tokens"}}
    outputs = ["sam_masks", "iou"] + (["hq_masks"] if hq else [])
    return _export(ServerDecoder(_float32_cpu(model), grid), args, names, outputs, dynamic, path)


def picture_graph_path(decoder_path: Path) -> Path:
    """Where `export_browser_decoder` writes the picture graph that goes with the decoder graph at `decoder_path`."""
    decoder_path = Path(decoder_path)
    return decoder_path.with_name(f"{decoder_path.stem}-picture.onnx")


def export_browser_picture(model, path: Path) -> Path:
    """Write the browser's picture graph (`BrowserPicture`) of `model` to `path`. Input: tokens float32
    (1, 1, H*W, C) = `PictureFeatures.tokens`. Outputs: keys, values, queries float32 (1, 1, H*W, C/2), as
    `PictureFeatures` holds them, and positions float32 (1, 1, H*W, C), the decoder graph's inputs of those names."""
    grid = _grid(model)
    tokens = _example_picture(model, grid)["tokens"]
    module = BrowserPicture(_float32_cpu(model))
    outputs = ["keys", "values", "queries", "positions"]
    _export(module, (tokens,), ["tokens"], outputs, {}, path)
    return _name_outputs(path, outputs)


def _name_outputs(path: Path, names: list[str]) -> Path:
    """Give the graph's outputs `names`: an output the exporter folded into a constant (the positional grid, which
    depends on no input) keeps the constant's name whatever `output_names` asked; an Identity node renames it."""
    import onnx

    graph_model = onnx.load(str(path))
    graph = graph_model.graph
    changed = False
    for output, name in zip(graph.output, names):
        if output.name != name:
            graph.node.append(onnx.helper.make_node("Identity", [output.name], [name], name=f"output_{name}"))
            output.name = name
            changed = True
    if changed:
        onnx.save(graph_model, str(path))
    return Path(path)


def export_browser_decoder(model, path: Path, sam_only: bool = False) -> Path:
    """Write the browser graph of `model` to `path`, and its picture graph (`export_browser_picture`) beside it at
    `picture_graph_path(path)`: the page runs that one once per picture, this one per hover. Inputs: tokens
    float32 (1, 1, H*W, C) = `PictureFeatures.tokens`; keys, values, queries, positions: the picture graph's
    outputs; hq_features float32 (1, C/8, 4H, 4W) = `PictureFeatures.hq_features` (SAM-HQ only); point_coords
    float32 (1, P, 2) in the 1024 frame; point_labels float32 (1, P) in Meta's convention (1 include, 0 exclude,
    2/3 box corners, -1 the pad the caller appends when there is no box); P dynamic. Outputs: low_res_logits
    float32 (1, 1, 4H, 4W), the candidate the engine ranks first for that object (HQ mask added), and score float32
    (1,), its predicted IoU. `sam_only`: without the HQ mask and without the hq_features input (`BrowserDecoder`),
    the hover preview's cheaper graph."""
    grid = _grid(model)
    picture = _example_picture(model, grid)
    coords, labels = meta_prompt(np.array([[[10.0, 20.0], [300.0, 400.0]]]), np.ones((1, 2)), None)
    hq = "hq_features" in picture and not sam_only
    float_model = _float32_cpu(model)
    positions = dec.positional_tokens(float_model).clone()
    names = ["tokens", "keys", "values", "queries", "positions", "point_coords", "point_labels"]
    names += ["hq_features"] if hq else []
    args = tuple(picture[n] for n in names[:4]) + (positions, torch.from_numpy(coords), torch.from_numpy(labels))
    args += (picture["hq_features"],) if hq else ()
    dynamic = {"point_coords": {1: "points"}, "point_labels": {1: "points"}}
    module = BrowserDecoder(float_model, grid, sam_only)
    _export(module, args, names, ["low_res_logits", "score"], dynamic, path)
    export_browser_picture(float_model, picture_graph_path(path))
    return Path(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="hub id (from the local HF cache) or checkpoint folder")
    parser.add_argument(
        "--out", type=Path, help="where to write the graph (default: the server's graph cache under HF_HOME)"
    )
    parser.add_argument("--browser", action="store_true", help="write the browser graph instead of the server's")
    parser.add_argument("--sam-only", action="store_true", help="with --browser: SAM's tokens only, no HQ mask")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from .models import load_model

    loaded = load_model(args.model, "cpu")
    if args.browser:
        out = args.out or Path(f"{Path(args.model).name}-browser-decoder.onnx")
        path = export_browser_decoder(loaded.model, out, sam_only=args.sam_only)
    elif args.out is not None:
        path = export_server_decoder(loaded.model, args.out)
    else:  # where the server looks for it (SAMHQ_DECODER=onnx|auto): its start then skips the export
        from .onnx_decoder import cached_server_graph

        path = cached_server_graph(loaded.model, loaded.id)
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
