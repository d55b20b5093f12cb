"""The ShotStream DiT: diffusers' `WanTransformer3DModel` with every ShotStream feature.

One class serves the bidirectional teacher (and its critic) and the causal student; they differ only in
how they are called:
  * frame-concat conditioning: clean context latents come first on the frame axis, then the target;
  * per-frame timesteps `(B, F)` (the student gives context frames t = 0; the teacher gives them the
    target's t, as the reference does);
  * the RoPE shot phase with caller-chosen temporal positions (`rope.py`);
  * multi-caption cross-attention (`multi_caption.py`);
  * the dual KV cache for the causal student (`dual_cache.py`) or an explicit mask for block-causal training.

Parameter names are diffusers' Wan names, so diffusers-format and converted original Wan / ShotStream
checkpoints load unchanged (`checkpoint.py`).
"""

from __future__ import annotations

import dataclasses

import torch
from diffusers.configuration_utils import register_to_config
from diffusers.models.transformers.transformer_wan import WanTransformer3DModel, WanTransformerBlock
from torch import nn

from .dual_cache import DualCacheAttnProcessor, DualKVCache, SelfAttentionPlan
from .multi_caption import CaptionRouting, MultiCaptionAttnProcessor
from .presets import TransformerConfig
from .rope import SHOT_PHASE, rotary_tables, shot_phase_angles


def sinusoidal_embedding(timestep: torch.Tensor, dim: int) -> torch.Tensor:
    """Wan's timestep sinusoid `[cos(t w_i), sin(t w_i)]`, `w_i = 10000^(-i / (dim/2))`, in float64.

    `(N,) -> (N, dim)`. diffusers computes this in float32; float64 matches the reference exactly.
    """
    half = dim // 2
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=timestep.device) / half)
    args = timestep.double()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


class ShotStreamBlock(WanTransformerBlock):
    """`WanTransformerBlock` with one modulation per latent frame and ShotStream attention arguments.

    Same math as the parent (norms and modulation in float32), but `temb` is `(B, F, 6, C)` and is
    broadcast over each frame's tokens instead of being expanded to one row per token.
    """

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None,
        temb: torch.Tensor,
        plan: SelfAttentionPlan,
        routing: CaptionRouting,
        layer: int,
    ) -> torch.Tensor:
        num_frames = temb.shape[1]  # hidden_states: (B, F*T, C); temb: (B, F, 6, C)
        modulation = (self.scale_shift_table.unsqueeze(0) + temb.float()).chunk(6, dim=2)  # 6 x (B, F, 1, C)
        shift_msa, scale_msa, gate_msa, shift_ffn, scale_ffn, gate_ffn = modulation

        def modulate(norm: nn.Module, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor):
            y = norm(x.float()).unflatten(1, (num_frames, -1)) * (1 + scale) + shift  # (B, F, T, C)
            return y.flatten(1, 2).type_as(x)

        def add_gated(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor):
            out = x.float().unflatten(1, (num_frames, -1)) + y.float().unflatten(1, (num_frames, -1)) * gate
            return out.flatten(1, 2).type_as(x)

        # 1. Self-attention (shot-phase RoPE, dual KV cache or mask)
        attn_output = self.attn1(modulate(self.norm1, hidden_states, shift_msa, scale_msa), plan=plan, layer=layer)
        hidden_states = add_gated(hidden_states, attn_output, gate_msa)
        # 2. Cross-attention (each frame to its shot's caption), no gate
        norm_hidden_states = self.norm2(hidden_states.float()).type_as(hidden_states)
        hidden_states = hidden_states + self.attn2(
            norm_hidden_states, encoder_hidden_states, routing=routing, layer=layer
        )
        # 3. Feed-forward
        ff_output = self.ffn(modulate(self.norm3, hidden_states, shift_ffn, scale_ffn))
        return add_gated(hidden_states, ff_output, gate_ffn)


class ShotStreamTransformer(WanTransformer3DModel):
    """Wan2.1 T2V DiT for ShotStream (teacher, critic and causal student share this class).

    Public tensor layout: latents `(B, C, F, H, W)`, tokens `(B, L, C)` with `L = F * (H/2) * (W/2)` in
    (frame, row, column) order.
    """

    _no_split_modules = ["ShotStreamBlock"]
    _repeated_blocks = ["ShotStreamBlock"]

    @register_to_config
    def __init__(
        self,
        patch_size: tuple[int, ...] = (1, 2, 2),
        num_attention_heads: int = 12,
        attention_head_dim: int = 128,
        in_channels: int = 16,
        out_channels: int = 16,
        text_dim: int = 4096,
        freq_dim: int = 256,
        ffn_dim: int = 8960,
        num_layers: int = 30,
        cross_attn_norm: bool = True,
        qk_norm: str | None = "rms_norm_across_heads",
        eps: float = 1e-6,
        rope_max_seq_len: int = 1024,
        shot_phase: float = SHOT_PHASE,
    ) -> None:
        super().__init__(
            patch_size=patch_size,
            num_attention_heads=num_attention_heads,
            attention_head_dim=attention_head_dim,
            in_channels=in_channels,
            out_channels=out_channels,
            text_dim=text_dim,
            freq_dim=freq_dim,
            ffn_dim=ffn_dim,
            num_layers=num_layers,
            cross_attn_norm=cross_attn_norm,
            qk_norm=qk_norm,
            eps=eps,
            rope_max_seq_len=rope_max_seq_len,
        )
        inner_dim = num_attention_heads * attention_head_dim
        self.blocks = nn.ModuleList(
            [
                ShotStreamBlock(inner_dim, ffn_dim, num_attention_heads, qk_norm, cross_attn_norm, eps)
                for _ in range(num_layers)
            ]
        )
        for block in self.blocks:
            block.attn1.set_processor(DualCacheAttnProcessor())
            block.attn2.set_processor(MultiCaptionAttnProcessor())

    @classmethod
    def from_preset(cls, config: TransformerConfig, shot_phase: float = SHOT_PHASE) -> ShotStreamTransformer:
        """A freshly initialised transformer of a preset's size (`shot_phase=0`: the no-shot-phase ablation)."""
        return cls(**dataclasses.asdict(config), shot_phase=shot_phase)

    def new_cache(self, batch_size: int, context_frames: int, shot_frames: int, tokens_per_frame: int) -> DualKVCache:
        """An empty dual KV cache sized for `context_frames + shot_frames` latent frames."""
        param = self.proj_out.weight
        return DualKVCache(
            num_layers=len(self.blocks),
            batch_size=batch_size,
            context_tokens=context_frames * tokens_per_frame,
            shot_tokens=shot_frames * tokens_per_frame,
            heads=self.config.num_attention_heads,
            head_dim=self.config.attention_head_dim,
            device=param.device,
            dtype=param.dtype,
        )

    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        shot_flags: torch.Tensor,
        positions: torch.Tensor,
        cache: DualKVCache | None = None,
        cache_frame: int = 0,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predict the flow `v = noise - x0` for every input frame.

        Args:
            hidden_states: latents `(B, C, F, H, W)`; context frames (if any) first.
            timestep: `(B, F)` per-frame timesteps, or `(B,)` for one timestep per sample.
            encoder_hidden_states: `(S, text_len, text_dim)` text-encoder output, one row per caption.
            shot_flags: `(F,)` int shot flag per frame (RoPE phase, caption routing).
            positions: `(F,)` int temporal RoPE position per frame.
            cache: dual KV cache; when given, this call's K/V are written at frame `cache_frame` of it
                (context insert: 0; chunk b of the shot: `Nc + b * frames_per_chunk`) and every token
                attends to cache frames `[0, cache_frame + F)`.
            attention_mask: `(L, L)` bool, True = may attend (block-causal training); needs `cache=None`.

        Returns:
            flow `(B, C, F, H, W)`.
        """
        batch, _, num_frames, height, width = hidden_states.shape
        p_t, p_h, p_w = self.config.patch_size
        grid = (height // p_h, width // p_w)
        tokens_per_frame = grid[0] * grid[1]
        if timestep.ndim == 1:
            timestep = timestep[:, None].expand(batch, num_frames)

        # 1. Patch embedding and shot-phase RoPE
        angles = shot_phase_angles(
            positions, shot_flags, grid, self.config.attention_head_dim, phase_step=self.config.shot_phase
        )
        plan = SelfAttentionPlan(
            rotary_tables(angles, hidden_states.device),
            cache=cache,
            cache_start=cache_frame * tokens_per_frame,
            mask=None if attention_mask is None else attention_mask.to(hidden_states.device),
        )
        routing = CaptionRouting.from_flags(shot_flags, encoder_hidden_states.shape[0], tokens_per_frame, cache)
        x = self.patch_embedding(hidden_states).flatten(2).transpose(1, 2).contiguous()  # (B, L, C)

        # 2. Per-frame time embedding and caption embedding
        temb, timestep_proj = self._embed_timestep(timestep, x.dtype)  # (B, F, C), (B, F, 6, C)
        text = self._embed_text(encoder_hidden_states, cache)  # (S, text_len, C) or None when cached

        # 3. Transformer blocks
        for layer, block in enumerate(self.blocks):
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                x = self._gradient_checkpointing_func(block, x, text, timestep_proj, plan, routing, layer)
            else:
                x = block(x, text, timestep_proj, plan, routing, layer)

        # 4. Output norm (per-frame modulation), projection and unpatchify
        shift, scale = (self.scale_shift_table.unsqueeze(0) + temb.unsqueeze(2)).chunk(2, dim=2)  # (B, F, 1, C)
        x = self.norm_out(x.float()).unflatten(1, (num_frames, -1)) * (1 + scale) + shift
        x = self.proj_out(x.flatten(1, 2).type_as(hidden_states))  # (B, L, p_t*p_h*p_w*C_out)
        x = x.reshape(batch, num_frames // p_t, grid[0], grid[1], p_t, p_h, p_w, -1)
        return x.permute(0, 7, 1, 4, 2, 5, 3, 6).flatten(6, 7).flatten(4, 5).flatten(2, 3)

    def _embed_timestep(self, timestep: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """`(B, F)` timesteps -> `temb (B, F, C)` and block modulation `(B, F, 6, C)`."""
        embedder = self.condition_embedder
        sinusoid = sinusoidal_embedding(timestep.flatten(), self.config.freq_dim)  # (B*F, freq_dim)
        time_dtype = embedder.time_embedder.linear_1.weight.dtype
        temb = embedder.time_embedder(sinusoid.to(time_dtype)).to(dtype)  # (B*F, C)
        timestep_proj = embedder.time_proj(embedder.act_fn(temb))  # (B*F, 6C)
        batch, num_frames = timestep.shape
        return temb.reshape(batch, num_frames, -1), timestep_proj.reshape(batch, num_frames, 6, -1)

    def _embed_text(self, encoder_hidden_states: torch.Tensor, cache: DualKVCache | None) -> torch.Tensor | None:
        """Caption embeddings `(S, text_len, C)`; skipped when the shot's text K/V are already cached."""
        if cache is not None and cache.text[0] is not None and not torch.is_grad_enabled():
            return None
        return self.condition_embedder.text_embedder(encoder_hidden_states)
