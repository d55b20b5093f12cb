"""ShotStream's dual KV cache and the self-attention processor that reads and writes it.

The causal student keeps, per transformer layer, post-RoPE keys and values of
  * the **global context cache**: the `Nc` context latent frames sampled from earlier shots, written once
    per shot by the context insert (reference `kv_cache1_context`), and
  * the **local cache**: the chunks of the shot being generated (reference `kv_cache1`); each chunk's
    denoising steps overwrite its own slot and the clean re-run at t=0 leaves the final K/V there.
Both are reset at every shot, so memory is bounded by the preset, not by the story length.

Layout: one buffer per layer, `[global | local]` along the token axis, so a chunk attends to the
contiguous prefix `[0, end)` = context + earlier chunks + itself, with no copy or concatenation
(the reference clones the local cache and concatenates on every call). Cross-attention K/V of the
shot's captions are cached here too (`text`), filled lazily by `multi_caption.py`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn

from .rope import apply_rotary


class DualKVCache:
    """Per-layer K/V buffers `(B, context_tokens + shot_tokens, heads, head_dim)` plus text K/V.

    Args:
        num_layers: transformer blocks.
        context_tokens: tokens of the global context cache (`Nc * tokens_per_frame`).
        shot_tokens: tokens of the local cache (`frames_per_shot * tokens_per_frame`).
    """

    def __init__(
        self,
        num_layers: int,
        batch_size: int,
        context_tokens: int,
        shot_tokens: int,
        heads: int,
        head_dim: int,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        shape = (batch_size, context_tokens + shot_tokens, heads, head_dim)
        self.context_tokens = context_tokens
        self.capacity = shape[1]
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(num_layers)]
        self.text: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * num_layers

    def reset(self) -> None:
        """Start a new shot: forget the text K/V (K/V slots are always written before they are read)."""
        self.text = [None] * len(self.keys)

    def global_cache(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views of the global context cache `(B, context_tokens, heads, head_dim)`."""
        n = self.context_tokens
        return self.keys[layer][:, :n], self.values[layer][:, :n]

    def local_cache(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views of the local (current-shot) cache `(B, shot_tokens, heads, head_dim)`."""
        n = self.context_tokens
        return self.keys[layer][:, n:], self.values[layer][:, n:]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)


@dataclass
class SelfAttentionPlan:
    """Per-call arguments of the self-attention processor (shared by all layers of one forward).

    Exactly one mode applies:
      * `cache is None`: attend within this call's tokens, optionally under `mask` `(L, L)` (True = may
        attend); the bidirectional teacher and the block-causal training forward;
      * `cache` given: write this call's K/V at token offset `cache_start` and attend to
        `[0, cache_start + L)`; the context insert uses offset 0, chunk b uses `context_tokens + b * chunk_tokens`.
    """

    rotary: tuple[torch.Tensor, torch.Tensor]  # cos, sin: (1, L, 1, head_dim/2)
    cache: DualKVCache | None = None
    cache_start: int = 0
    mask: torch.Tensor | None = None


class DualCacheAttnProcessor:
    """Self-attention of a `WanAttention` with shot-phase RoPE and the dual KV cache."""

    _attention_backend = None
    _parallel_config = None

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
        *,
        plan: SelfAttentionPlan,
        layer: int,
    ) -> torch.Tensor:
        query = attn.norm_q(attn.to_q(hidden_states)).unflatten(2, (attn.heads, -1))  # (B, L, H, D)
        key = attn.norm_k(attn.to_k(hidden_states)).unflatten(2, (attn.heads, -1))
        value = attn.to_v(hidden_states).unflatten(2, (attn.heads, -1))
        query, key = apply_rotary(query, *plan.rotary), apply_rotary(key, *plan.rotary)
        if plan.cache is not None:
            key, value = _write_and_read(plan.cache, layer, plan.cache_start, key, value)
        out = dispatch_attention_fn(query, key, value, attn_mask=plan.mask, backend=self._attention_backend)
        return attn.to_out[0](out.flatten(2, 3).type_as(query))  # (B, L, C)


def _write_and_read(
    cache: DualKVCache, layer: int, start: int, key: torch.Tensor, value: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Store this call's K/V at `[start, start + L)` and return keys/values for `[0, start + L)`.

    The cache never carries gradients. When this call needs them (a self-forcing step with grad),
    its own K/V are concatenated to the cached prefix instead of being read back from the buffer.
    """
    end = start + key.shape[1]
    if end > cache.capacity:
        raise ValueError(f"KV cache overflow: writing tokens [{start}, {end}) into {cache.capacity}")
    cache.keys[layer][:, start:end] = key.detach()
    cache.values[layer][:, start:end] = value.detach()
    if torch.is_grad_enabled() and (key.requires_grad or value.requires_grad):
        past_k, past_v = cache.keys[layer][:, :start], cache.values[layer][:, :start]
        return torch.cat([past_k, key], dim=1), torch.cat([past_v, value], dim=1)
    return cache.keys[layer][:, :end], cache.values[layer][:, :end]
