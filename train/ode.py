"""Stage 2.1b: causal initialisation of the student by ODE regression (reference §5.3).

The student starts from the teacher's weights (same parameter names) and learns to jump from any point of a
teacher trajectory to its end, under the block-causal mask it will later see through its KV caches:
  1. truncate the target to whole chunks; per chunk draw `idx ~ U{0..K}` over the trajectory entries
     (t = 1000, 957.93, 888.89, 737.59 and the clean end point, t = 0);
  2. input = `[context latents (t = 0) ; per-chunk trajectory latents (their t)]`, shot flags and positions
     `0..Nc+F-1`, `block_causal_mask` (context sees context, chunk i sees context + chunks <= i);
  3. x0 = x_t - sigma v (float64); loss = MSE(x0, trajectory end) on frames with t > 0;
10 % text dropout, no context dropout; all parameters train.
"""

from __future__ import annotations

import lightning as L
import torch

from shotstream.block_mask import block_causal_mask
from shotstream.presets import ShotStreamPreset
from shotstream.sampling import ShotConditioning
from shotstream.scheduler import FlowMatchTable
from shotstream.transformer import ShotStreamTransformer

from .callbacks import strip_prefix
from .conditioning import FrozenEncoders, drop_text, frame_flags, step_generator
from .config import ODEConfig
from .losses import ode_regression_loss
from .ode_pairs import ODEPair
from .optim import adamw, clip_gradients


def chunk_inputs(
    trajectory: torch.Tensor, timesteps: torch.Tensor, frames_per_chunk: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick one trajectory entry per chunk (step 1).

    Args:
        trajectory: `(1, K + 1, C, F, h, w)` with F a multiple of `frames_per_chunk`.
        timesteps: `(K + 1,)` timestep of each entry.
    Returns:
        latents `(1, C, F, h, w)` and their per-frame timesteps `(F,)`.
    """
    num_entries, num_frames = trajectory.shape[1], trajectory.shape[3]
    entry = torch.randint(0, num_entries, (num_frames // frames_per_chunk,), generator=generator)
    entry = entry.repeat_interleave(frames_per_chunk)  # (F,)
    frames = torch.arange(num_frames)
    latents = trajectory[0].permute(0, 2, 1, 3, 4)[entry.to(trajectory.device), frames]  # (F, C, h, w)
    return latents.permute(1, 0, 2, 3)[None], timesteps.cpu()[entry]


class ODERegression(L.LightningModule):
    """Causal student trained to regress the teacher's ODE end points under the block-causal mask."""

    def __init__(
        self,
        student: ShotStreamTransformer,
        encoders: FrozenEncoders,
        preset: ShotStreamPreset,
        config: ODEConfig,
        seed: int,
    ) -> None:
        super().__init__()
        self.student = student.requires_grad_(True)
        self.encoders, self.config, self.seed = encoders, config, seed
        self.frames_per_chunk = preset.frames_per_chunk
        self.table = FlowMatchTable(preset.timestep_shift)

    def on_fit_start(self) -> None:
        self.encoders.to(self.device)

    def training_step(self, batch: ODEPair, batch_idx: int) -> torch.Tensor:
        generator = step_generator(self.seed, self.global_step, self.global_rank)
        embeds = drop_text(self.encoders.captions(batch.captions), self.config.text_dropout, generator)
        # 1. whole chunks, one trajectory entry per chunk
        num_frames = batch.trajectory.shape[3] // self.frames_per_chunk * self.frames_per_chunk
        trajectory = batch.trajectory[:, :, :, :num_frames]
        x, t_target = chunk_inputs(trajectory, batch.timesteps, self.frames_per_chunk, generator)
        # 2. block-causal forward, context at t = 0
        context = batch.context_latents
        num_context = context.shape[2]
        timestep = torch.cat([torch.zeros(num_context), t_target])[None].to(self.device)  # (1, Nc + F)
        cond = ShotConditioning(context, batch.context_flags, batch.shot_flag, embeds)
        flags = frame_flags(cond, num_frames)
        mask = block_causal_mask(num_context, num_frames, self.frames_per_chunk, self._tokens_per_frame(x))
        latents = torch.cat([context, x], dim=2)
        flow = self.student(latents, timestep, embeds, flags, torch.arange(flags.shape[0]), attention_mask=mask)
        # 3. x0 regression on the noisy frames
        x0 = self.table.flow_to_x0(flow[:, :, num_context:], x, timestep[:, num_context:])
        loss = ode_regression_loss(x0, trajectory[:, -1], timestep[:, num_context:])
        self.log("ode/loss", loss, prog_bar=True)
        return loss

    def _tokens_per_frame(self, latents: torch.Tensor) -> int:
        _, p_h, p_w = self.student.config.patch_size
        return (latents.shape[3] // p_h) * (latents.shape[4] // p_w)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        opt = self.config.optimizer
        return adamw(self.student.parameters(), opt.lr, opt.betas, opt.weight_decay)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        clip_gradients(self, optimizer, self.config.optimizer.max_grad_norm)

    def exports(self, state_dict: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
        """Files for `callbacks.SafetensorsExport`: the causally initialised student."""
        return {"student.safetensors": strip_prefix(state_dict, "student.")}
