"""Bound the image encoder's peak memory: global attention a few heads at a time.

transformers' `SamHQVisionAttention` / `SamVisionAttention` (eager and sdpa) attend all heads at
once. In the ViT's global-attention layers that is every head over all 64x64 = 4096 tokens: for
ViT-B 12 x 4096 x 4096 float32 = 768 MiB of attention weights, as much again for the decomposed
relative-position bias, and the softmax's copy, about 1.6 GiB above idle for one encode
(docs/RELIABILITY.md). `chunk_global_attention` makes those layers compute the same attention
`HEADS_PER_CHUNK` heads at a time and concatenate the heads' outputs before `proj`; per head the
math and its order are transformers' own. Windowed layers (14 x 14 tokens) are left alone.
The changed layers return no attention weights (as transformers' sdpa layers): the engine never asks
for them.
`models.load_model` calls it on every model it loads; tests/test_encoder_memory.py checks parity.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F

# Chosen by measurement on a 2-core CPU (docs/PERFORMANCE.md, benchmarks/encoder_attention.py).
HEADS_PER_CHUNK = 2


def _is_sdpa(attention) -> bool:
    return type(attention).__name__.endswith("SdpaAttention")


def _chunked_forward(self, hidden_states: torch.Tensor, output_attentions=None):
    """The module's forward with the attention done `self.heads_per_chunk` heads at a time."""
    if output_attentions:  # full weights asked for: nothing to save, keep transformers' path
        return type(self).forward(self, hidden_states, output_attentions)
    batch_size, height, width, _ = hidden_states.shape
    heads = self.num_attention_heads
    tokens = height * width
    qkv = self.qkv(hidden_states).reshape(batch_size, tokens, 3, heads, -1).permute(2, 0, 3, 1, 4)
    # (batch_size * heads, tokens, head_dim) each, as in transformers
    query, key, value = qkv.reshape(3, batch_size * heads, tokens, -1).unbind(0)
    sdpa = _is_sdpa(self)
    outputs = []
    for start in range(0, batch_size * heads, self.heads_per_chunk):
        q = query[start : start + self.heads_per_chunk]
        k = key[start : start + self.heads_per_chunk]
        v = value[start : start + self.heads_per_chunk]
        bias = None
        if self.use_rel_pos:
            bias = self.get_decomposed_rel_pos(q, self.rel_pos_h, self.rel_pos_w, (height, width), (height, width))
            bias = bias.reshape(q.shape[0], tokens, tokens)
        if sdpa:
            out = F.scaled_dot_product_attention(
                q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), attn_mask=None if bias is None else bias.unsqueeze(0)
            ).squeeze(0)
        else:
            weights = (q * self.scale) @ k.transpose(-2, -1)
            if bias is not None:
                weights = weights + bias
                del bias
            weights = F.softmax(weights, dtype=torch.float32, dim=-1).to(q.dtype)
            weights = F.dropout(weights, p=self.dropout, training=self.training)
            out = weights @ v
            del weights
        outputs.append(out)
    attn_output = torch.cat(outputs, dim=0).reshape(batch_size, heads, height, width, -1)
    attn_output = attn_output.permute(0, 2, 3, 1, 4).reshape(batch_size, height, width, -1)
    return self.proj(attn_output), None


def chunk_global_attention(model, heads_per_chunk: int = HEADS_PER_CHUNK) -> int:
    """Make the vision encoder's global-attention layers attend `heads_per_chunk` heads at a time.

    For SamHQModel and SamModel, eager or sdpa attention; the one place this is done. Returns how
    many layers were changed (0 for an encoder without global attention). Idempotent.
    """
    if heads_per_chunk < 1:
        raise ValueError(f"heads_per_chunk must be >= 1, not {heads_per_chunk}")
    changed = 0
    for layer in model.vision_encoder.layers:
        if layer.window_size != 0:  # windowed: 14 x 14 tokens per window, small
            continue
        attention = layer.attn
        attention.heads_per_chunk = heads_per_chunk
        attention.forward = types.MethodType(_chunked_forward, attention)
        changed += 1
    return changed
