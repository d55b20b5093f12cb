"""The self-forcing training rollout of the causal student (reference `inference_with_trajectory`, §5.4).

The student generates a whole shot chunk by chunk through its dual KV cache, exactly as at inference,
except:
  1. one exit step `e ~ U{0..steps-1}` is drawn per rollout and shared by every chunk
     (`same_step_across_blocks`); the chunk's output is its x0 prediction at step e. The caller draws it
     from a generator shared by all ranks (the reference broadcasts it): under FSDP every rank must run
     the same number of forwards;
  2. steps before e run without gradient (re-noising x0 to the next warped timestep); step e runs with
     gradient when `with_grad`, so the loss reaches every chunk's last forward, never the caches;
  3. the cache re-run uses `add_noise(x0, eps, t=0)` at timestep 0: sigma = 0 is not in the table, so the
     reference adds sigma ~ 0.0079 noise here during training (quirk 18), unlike inference.
Noise is drawn from an explicit CPU generator.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch

from shotstream.dual_cache import DualKVCache
from shotstream.sampling import ShotConditioning, StudentSampler
from shotstream.scheduler import FlowMatchTable
from shotstream.transformer import ShotStreamTransformer

from .conditioning import randn_like


@dataclass
class Rollout:
    latents: torch.Tensor  # (1, C, F, h, w) each chunk's x0 at the exit step (with grad when asked)
    exit_step: int


def chunk_forward(
    model: ShotStreamTransformer,
    x: torch.Tensor,
    timestep: torch.Tensor,
    frame: int,
    cond: ShotConditioning,
    cache: DualKVCache,
) -> torch.Tensor:
    """The student on one chunk `(1, C, f, h, w)` at timesteps `(1, f)`, written at cache frame `frame`.

    Returns the predicted flow `(1, C, f, h, w)`.
    """
    num = x.shape[2]
    flags = torch.full((num,), cond.shot_flag, dtype=torch.int32)
    positions = torch.arange(frame, frame + num)
    return model(x, timestep, cond.caption_embeds, flags, positions, cache=cache, cache_frame=frame)


def self_forcing_rollout(
    model: ShotStreamTransformer,
    table: FlowMatchTable,
    timesteps: torch.Tensor,
    cond: ShotConditioning,
    num_frames: int,
    frames_per_chunk: int,
    exit_step: int,
    generator: torch.Generator,
    with_grad: bool,
) -> Rollout:
    """Generate `num_frames` latent frames after the context in `cond` (see module docstring).

    Args:
        timesteps: `(steps,)` the warped denoising timesteps, float32.
        exit_step: index into `timesteps` of the step whose x0 is the chunk's output.
        generator: CPU generator of the initial and re-noising draws.
    """
    context = cond.context_latents  # (1, C, Nc, h, w)
    _, p_h, p_w = model.config.patch_size
    cache = model.new_cache(1, cond.num_context, num_frames, (context.shape[3] // p_h) * (context.shape[4] // p_w))
    with torch.no_grad():
        StudentSampler(model, table, timesteps, frames_per_chunk).insert_context(cond, cache)
    shape = (1, context.shape[1], num_frames, *context.shape[3:])
    noise = torch.randn(shape, generator=generator).to(context.device, context.dtype)
    chunks = []
    for start in range(0, num_frames, frames_per_chunk):
        frame, x = cond.num_context + start, noise[:, :, start : start + frames_per_chunk]
        steps = timesteps.to(x.device)[:, None, None].expand(-1, 1, x.shape[2])  # (steps, 1, f)
        # 1-2. denoise down to the exit step; only the exit step keeps the graph
        for i in range(exit_step + 1):
            with nullcontext() if with_grad and i == exit_step else torch.no_grad():
                x0 = table.flow_to_x0(chunk_forward(model, x, steps[i], frame, cond, cache), x, steps[i])
            if i < exit_step:
                x = table.add_noise(x0, randn_like(x0, generator), steps[i + 1])
        # 3. cache re-run at t = 0 on the output re-noised with the table's smallest sigma (quirk 18)
        with torch.no_grad():
            zero = torch.zeros_like(steps[0])
            renoised = table.add_noise(x0.detach(), randn_like(x0, generator), zero)
            chunk_forward(model, renoised, zero, frame, cond, cache)
        chunks.append(x0)
    return Rollout(torch.cat(chunks, dim=2), exit_step)
