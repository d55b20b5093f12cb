"""Sampling: the causal student's 4-step chunk loop and the teacher's 50-step Euler sampler with CFG.

Student, per shot (reference `CausalInferenceArPipeline.inference`, §3.4-3.5):
  1. context insert: one forward over the `Nc` clean context latents at t = 0 fills the global cache;
  2. for each chunk of 3 latent frames: 4 denoising steps at the warped timesteps
     [1000, 957.93, 888.89, 737.59], re-noising the x0 prediction between steps with fresh noise;
  3. the clean re-run: one more forward on the final x0 at t = 0 writes clean K/V into the local cache.
36 forwards per 21-frame shot. Noise is drawn from a CPU `torch.Generator` in the reference's order and
shapes, so a seed gives the same video on any device; tests can inject any `NoiseSource`.

All latents are `(B, C, F, H, W)`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import torch

from .dual_cache import DualKVCache
from .scheduler import EulerSampler, FlowMatchTable
from .transformer import ShotStreamTransformer


@dataclass
class ShotConditioning:
    """What the model needs to generate one shot."""

    context_latents: torch.Tensor  # (1, C, Nc, h, w) clean context latents (zeros for the first shot)
    context_flags: torch.Tensor  # (Nc,) int shot flag of each context frame
    shot_flag: int  # flag of the generated frames
    caption_embeds: torch.Tensor  # (S, text_len, text_dim) captions of shots 0..k

    @property
    def num_context(self) -> int:
        return self.context_latents.shape[2]


class NoiseSource(Protocol):
    """Where the student's noise comes from (tests inject recorded draws)."""

    def initial(self, shape: tuple[int, ...]) -> torch.Tensor: ...  # (B, C, F, h, w)

    def renoise(self, shape: tuple[int, ...]) -> torch.Tensor: ...  # (B, C, f, h, w)


class GeneratorNoise:
    """Standard normal draws from a CPU generator, in the reference's draw order and layout.

    The reference draws `randn(B, F, C, h, w)` per shot and `randn_like` of the flattened `(B*f, C, h, w)`
    x0 between steps; drawing the same shapes keeps the stream identical for the same seed.
    """

    def __init__(self, generator: torch.Generator, device: torch.device, dtype: torch.dtype) -> None:
        self.generator, self.device, self.dtype = generator, device, dtype

    def _draw(self, shape: tuple[int, ...]) -> torch.Tensor:
        batch, channels, frames, height, width = shape
        noise = torch.randn((batch, frames, channels, height, width), generator=self.generator)
        return noise.permute(0, 2, 1, 3, 4).to(self.device, self.dtype)

    def initial(self, shape: tuple[int, ...]) -> torch.Tensor:
        return self._draw(shape)

    def renoise(self, shape: tuple[int, ...]) -> torch.Tensor:
        return self._draw(shape)


@dataclass
class StudentSampler:
    """The causal student's chunk-by-chunk sampler for one shot at a time."""

    model: ShotStreamTransformer
    table: FlowMatchTable
    denoising_timesteps: torch.Tensor  # (steps,) warped, float32
    frames_per_chunk: int

    def insert_context(self, cond: ShotConditioning, cache: DualKVCache) -> None:
        """Fill the global cache (and the shot's text K/V) from the context latents at t = 0."""
        cache.reset()
        n = cond.num_context
        timestep = torch.zeros((1, n), dtype=torch.long, device=cond.context_latents.device)
        self.model(
            cond.context_latents, timestep, cond.caption_embeds, cond.context_flags,
            torch.arange(n), cache=cache, cache_frame=0,
        )  # fmt: skip

    def denoise_chunk(
        self, x: torch.Tensor, chunk: int, cond: ShotConditioning, cache: DualKVCache, noise: NoiseSource
    ) -> torch.Tensor:
        """Run the few-step loop on chunk `chunk` starting from noise `x` `(1, C, f, h, w)`; returns x0."""
        frame = cond.num_context + chunk * self.frames_per_chunk
        steps = self.denoising_timesteps.to(x.device)
        for i, t in enumerate(steps):
            timestep = t.expand(1, x.shape[2])  # (1, f)
            flow = self._forward(x, timestep, frame, cond, cache)
            x0 = self.table.flow_to_x0(flow, x, timestep)
            if i + 1 == len(steps):
                return x0
            x = self.table.add_noise(x0, noise.renoise(tuple(x0.shape)), steps[i + 1].expand(1, x.shape[2]))
        raise ValueError("denoising_timesteps is empty")

    def commit_chunk(self, x0: torch.Tensor, chunk: int, cond: ShotConditioning, cache: DualKVCache) -> None:
        """The clean re-run: write the K/V of the finished chunk (t = 0) into its local-cache slot."""
        frame = cond.num_context + chunk * self.frames_per_chunk
        self._forward(x0, torch.zeros((1, x0.shape[2]), device=x0.device), frame, cond, cache)

    def rollout(
        self, cond: ShotConditioning, num_frames: int, cache: DualKVCache, noise: NoiseSource, shape: tuple
    ) -> Iterator[torch.Tensor]:
        """Generate one shot of `num_frames` latent frames; yields each chunk's x0 `(1, C, f, h, w)`."""
        self.insert_context(cond, cache)
        x = noise.initial((1, shape[0], num_frames, shape[1], shape[2]))  # (1, C, F, h, w)
        for chunk in range(num_frames // self.frames_per_chunk):
            frames = slice(chunk * self.frames_per_chunk, (chunk + 1) * self.frames_per_chunk)
            x0 = self.denoise_chunk(x[:, :, frames], chunk, cond, cache, noise)
            self.commit_chunk(x0, chunk, cond, cache)
            yield x0

    def _forward(self, x, timestep, frame, cond: ShotConditioning, cache: DualKVCache) -> torch.Tensor:
        num = x.shape[2]
        flags = torch.full((num,), cond.shot_flag, dtype=torch.int32)
        positions = torch.arange(frame, frame + num)
        return self.model(x, timestep, cond.caption_embeds, flags, positions, cache=cache, cache_frame=frame)


def teacher_sample(
    model: ShotStreamTransformer,
    sampler: EulerSampler,
    cond: ShotConditioning,
    negative_embeds: torch.Tensor,
    noise: torch.Tensor,
    guidance: float,
    record_steps: tuple[int, ...] = (),
) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """The bidirectional next-shot teacher: Euler over `sampler`'s steps with classifier-free guidance.

    `v = v_uncond + guidance (v_cond - v_uncond)`; the unconditional branch uses `negative_embeds` (one
    caption, routed to every frame) with the same context latents and flags. Context frames get the
    target's timestep (reference). Returns the final x0 `(1, C, F, h, w)` and the latents *before* each
    step in `record_steps` (the ODE pairs use steps 0, 13, 25, 37 of 50).
    """
    n = cond.num_context
    flags = torch.cat([cond.context_flags.int(), torch.full((noise.shape[2],), cond.shot_flag, dtype=torch.int32)])
    positions = torch.arange(flags.shape[0])
    x, recorded = noise, {}
    for i, t in enumerate(sampler.timesteps):
        if i in record_steps:
            recorded[i] = x
        latents = torch.cat([cond.context_latents, x], dim=2)  # (1, C, Nc + F, h, w)
        timestep = t.to(x.device).expand(1)
        v_cond = model(latents, timestep, cond.caption_embeds, flags, positions)[:, :, n:]
        v_uncond = model(latents, timestep, negative_embeds, flags, positions)[:, :, n:]
        x = sampler.step(v_uncond + guidance * (v_cond - v_uncond), i, x)
    return x, recorded
