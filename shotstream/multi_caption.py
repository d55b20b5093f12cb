"""Multi-caption cross-attention: every latent frame attends only to its own shot's caption.

The text encoder is run on one caption per shot (`global + "shot{k}:" + shot`), giving `S` rows. With a
single caption all frames attend to it (reference branch 1, used by shot 0 at inference). With `S > 1`,
frame f attends to caption `shot_flags[f]` (reference branch 2): context frames to the caption of the
shot they were sampled from, generated frames to the current shot's caption.

Zero-padded caption tokens are *not* masked: the reference attends to all `max_length` tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn

from .dual_cache import DualKVCache


@dataclass
class CaptionRouting:
    """Per-call arguments of the cross-attention processor.

    `caption_index` `(F,)` says which caption row each latent frame attends to; `cache`, when given,
    keeps each layer's text K/V for the whole shot (reference `crossattn_cache`).
    """

    caption_index: torch.Tensor  # (F,) int64 on CPU
    tokens_per_frame: int
    cache: DualKVCache | None = None

    @classmethod
    def from_flags(
        cls, shot_flags: torch.Tensor, num_captions: int, tokens_per_frame: int, cache: DualKVCache | None
    ) -> CaptionRouting:
        """The reference rule: route by shot flag when there are several captions, else caption 0."""
        flags = shot_flags.detach().cpu().long()
        index = flags if num_captions > 1 else torch.zeros_like(flags)
        if int(index.max()) >= num_captions:
            raise ValueError(f"shot flag {int(index.max())} has no caption (only {num_captions} given)")
        return cls(index, tokens_per_frame, cache)


class MultiCaptionAttnProcessor:
    """Cross-attention of a `WanAttention` with per-frame caption routing and a per-shot text K/V cache."""

    _attention_backend = None
    _parallel_config = None

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
        *,
        routing: CaptionRouting,
        layer: int,
    ) -> torch.Tensor:
        # hidden_states: (B, F*T, C) video tokens; encoder_hidden_states: (S, text_len, C) embedded captions
        query = attn.norm_q(attn.to_q(hidden_states)).unflatten(2, (attn.heads, -1))  # (B, L, H, D)
        key, value = _text_key_value(attn, encoder_hidden_states, routing.cache, layer)  # (S, N, H, D)
        batch = query.shape[0]
        query = query.unflatten(1, (-1, routing.tokens_per_frame))  # (B, F, T, H, D)
        out = torch.empty_like(query)
        for caption in routing.caption_index.unique().tolist():
            frames = (routing.caption_index == caption).nonzero().squeeze(1).to(query.device)
            q = query[:, frames].flatten(1, 2)  # (B, n*T, H, D)
            k = key[caption : caption + 1].expand(batch, -1, -1, -1)
            v = value[caption : caption + 1].expand(batch, -1, -1, -1)
            o = dispatch_attention_fn(q, k, v, backend=self._attention_backend)
            out[:, frames] = o.unflatten(1, (len(frames), -1))
        return attn.to_out[0](out.flatten(1, 2).flatten(2, 3).type_as(hidden_states))  # (B, L, C)


def _text_key_value(
    attn, text: torch.Tensor, cache: DualKVCache | None, layer: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Projected text keys/values `(S, text_len, heads, head_dim)`, from the shot's cache when filled.

    With gradients enabled (training) they are always recomputed, so the projections get gradients.
    """
    use_cache = cache is not None and not torch.is_grad_enabled()
    if use_cache and cache.text[layer] is not None:
        return cache.text[layer]
    key = attn.norm_k(attn.to_k(text)).unflatten(2, (attn.heads, -1))
    value = attn.to_v(text).unflatten(2, (attn.heads, -1))
    if use_cache:
        cache.text[layer] = (key, value)
    return key, value
