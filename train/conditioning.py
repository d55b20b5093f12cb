"""What every stage does with a clip before the transformer sees it: frozen encoders, dropout, randomness.

* `FrozenEncoders` holds the VAE and the text encoder. They are deliberately *not* submodules of the
  LightningModules: they are never trained and stay out of checkpoints (UMT5-XXL alone is 11 GB).
* Context dropout (§5.1, quirk 16): context latents -> 0 and all context flags -> 0, so the target gets
  flag 1 and, with several captions, is routed to caption 1 whichever shot it is.
* Text dropout (§5.1, quirk 17): all caption embeddings -> 0 (not an empty-prompt encoding), or, where the
  config says so, -> the negative prompt's encoding: then the unconditional branch that CFG guides against
  (ODE pairs, DMD real score) is one the teacher was trained on (the toy teacher starts from scratch).
* Randomness: one CPU `torch.Generator` per optimisation step, seeded from (seed, step, rank), so a resumed
  run draws exactly what an uninterrupted run draws and ranks draw differently.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from shotstream.sampling import ShotConditioning
from shotstream.scheduler import FlowMatchTable
from shotstream.text import TextEncoder
from shotstream.vae import VideoVAE

from .data import ClipSample


@dataclass
class FrozenEncoders:
    """The frozen VAE and text encoder; outputs are float32 on the encoders' device."""

    vae: VideoVAE
    text_encoder: TextEncoder
    negative_prompt: str
    _negative: torch.Tensor | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.vae.eval().requires_grad_(False)
        self.text_encoder.eval().requires_grad_(False)

    def to(self, device: torch.device) -> FrozenEncoders:
        self.vae.to(device)
        self.text_encoder.to(device)
        self._negative = None
        return self

    @torch.no_grad()
    def captions(self, captions: list[str]) -> torch.Tensor:
        """N captions -> `(N, text_len, text_dim)` zero-padded embeddings."""
        return self.text_encoder(captions).float()

    def negative(self) -> torch.Tensor:
        """The negative prompt `(1, text_len, text_dim)`: the unconditional branch of every CFG (cached)."""
        if self._negative is None:
            self._negative = self.captions([self.negative_prompt])
        return self._negative

    @torch.no_grad()
    def context(self, frames: torch.Tensor) -> torch.Tensor:
        """History frames `(Nc, 3, H, W)` -> `(1, C, Nc, h, w)`, each frame encoded as its own clip (§4.3)."""
        return self.vae.encode_frames(frames).float()

    @torch.no_grad()
    def target(self, video: torch.Tensor) -> torch.Tensor:
        """A shot `(3, 4k + 1, H, W)` -> `(1, C, k + 1, h, w)`, encoded as one causal clip (§5.1)."""
        return self.vae.encode_video(video[None]).float()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """`(1, C, F, h, w)` -> pixels `(1, 3, 1 + 4 (F - 1), H, W)` in [-1, 1]."""
        return self.vae.decode(latents)

    def clip_target(self, clip: ClipSample) -> torch.Tensor:
        """The clip's target shot as latents `(1, C, F, h, w)` (cached ones when the clip carries them)."""
        if clip.target_latents is not None:
            return clip.target_latents.to(self.vae.device)
        return self.target(clip.target_pixels)

    def clip_conditioning(self, clip: ClipSample) -> ShotConditioning:
        """Ground-truth history of a clip: encoded context frames, flags and all captions of the story."""
        if clip.context_latents is not None:
            context = clip.context_latents.to(self.vae.device)
        else:
            context = self.context(clip.context_pixels)
        return ShotConditioning(
            context_latents=context,
            context_flags=clip.context_flags.cpu(),
            shot_flag=clip.shot_flag,
            caption_embeds=self.captions(clip.captions),
        )


def step_generator(seed: int, step: int, rank: int) -> torch.Generator:
    """The CPU generator of one optimisation step (a function of seed, step and rank only)."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 1_009 + rank)


def randn_like(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Standard normal noise shaped like `x`, drawn on the CPU generator, moved to `x`'s device and dtype."""
    return torch.randn(x.shape, generator=generator).to(x.device, x.dtype)


def without_context(cond: ShotConditioning) -> ShotConditioning:
    """Zero context latents and flags; the target flag becomes 1 (the captions are kept)."""
    return ShotConditioning(
        context_latents=torch.zeros_like(cond.context_latents),
        context_flags=torch.zeros_like(cond.context_flags),
        shot_flag=1,
        caption_embeds=cond.caption_embeds,
    )


def drop_context(cond: ShotConditioning, p: float, generator: torch.Generator) -> ShotConditioning:
    """Context dropout (§5.1): with probability `p`, `without_context`."""
    return cond if torch.rand((), generator=generator) >= p else without_context(cond)


def drop_text(
    embeds: torch.Tensor, p: float, generator: torch.Generator, uncond: torch.Tensor | None = None
) -> torch.Tensor:
    """Text dropout (§5.1): with probability `p` every caption `(N, L, D)` becomes `uncond` `(1, L, D)`.

    `uncond=None` is the reference's all-zero embedding.
    """
    if torch.rand((), generator=generator) >= p:
        return embeds
    return torch.zeros_like(embeds) if uncond is None else uncond.to(embeds).expand_as(embeds)


def frame_flags(cond: ShotConditioning, num_frames: int) -> torch.Tensor:
    """Shot flags `(Nc + F,)` int32 of `[context ; target]` (context flags, then the shot flag)."""
    target = torch.full((num_frames,), cond.shot_flag, dtype=torch.int32)
    return torch.cat([cond.context_flags.int().cpu(), target])


def sample_timesteps(
    table: FlowMatchTable, batch: int, generator: torch.Generator, round_to_bf16: bool
) -> torch.Tensor:
    """`timesteps[U{0..999}]` `(batch,)` float32 on CPU; bf16-rounded like the reference under bf16 (§2)."""
    t = table.sample_timestep((batch,), generator)
    return t.to(torch.bfloat16).float() if round_to_bf16 else t
