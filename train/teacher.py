"""Stage 1: the bidirectional next-shot teacher, trained by flow matching (reference §5.1).

Per step, for one clip (`data.ClipSample`):
  1. encode the context frames one by one and the target shot as a clip (frozen VAE), and the captions;
  2. context dropout and text dropout (10 % each, independent);
  3. `t = timesteps[U{0..999}]`, one per sample; `x_t = (1 - sigma) x0 + sigma eps` for the target;
  4. frame-concat `[context (clean) ; x_t]` with flags `[context flags ; last + 1]`, positions `0..Nc+F-1`,
     and the target's t for *every* frame, context included (quirk 19);
  5. loss `w(t) * MSE(v[:, :, Nc:], eps - x0)`.
Trainable: the self-attention (`attn1`) parameters only (`trainable: self_attn`, reference `only_train3d`)
or everything (`all`, the toy world trains from scratch).
"""

from __future__ import annotations

from typing import Literal

import lightning as L
import torch

from shotstream.presets import ShotStreamPreset
from shotstream.scheduler import FlowMatchTable
from shotstream.transformer import ShotStreamTransformer

from .callbacks import strip_prefix
from .conditioning import (
    FrozenEncoders,
    drop_context,
    drop_text,
    frame_flags,
    randn_like,
    sample_timesteps,
    step_generator,
)
from .config import TeacherConfig
from .data import ClipSample
from .losses import flow_matching_loss
from .optim import adamw, clip_gradients


def set_trainable(model: torch.nn.Module, trainable: Literal["self_attn", "all"]) -> None:
    """`self_attn`: only parameters of the self-attention modules (`attn1`: q, k, v, o, norm_q, norm_k)."""
    for name, param in model.named_parameters():
        param.requires_grad_(trainable == "all" or ".attn1." in name)


class TeacherTuning(L.LightningModule):
    """Bidirectional next-shot flow matching on ground-truth clips."""

    def __init__(
        self,
        teacher: ShotStreamTransformer,
        encoders: FrozenEncoders,
        preset: ShotStreamPreset,
        config: TeacherConfig,
        seed: int,
        round_timesteps_to_bf16: bool,
    ) -> None:
        super().__init__()
        self.teacher = teacher
        set_trainable(self.teacher, config.trainable)
        self.encoders = encoders
        self.config, self.seed, self.round_timesteps_to_bf16 = config, seed, round_timesteps_to_bf16
        self.table = FlowMatchTable(preset.timestep_shift)

    def on_fit_start(self) -> None:
        self.encoders.to(self.device)

    def training_step(self, batch: ClipSample, batch_idx: int) -> torch.Tensor:
        generator = step_generator(self.seed, self.global_step, self.global_rank)
        # 1-2. encoders, dropout
        cond = drop_context(self.encoders.clip_conditioning(batch), self.config.context_dropout, generator)
        embeds = drop_text(cond.caption_embeds, self.config.text_dropout, generator, self.text_uncond())
        x0 = self.encoders.clip_target(batch)  # (1, C, F, h, w)
        # 3. noise the target at one table timestep
        t = sample_timesteps(self.table, 1, generator, self.round_timesteps_to_bf16).to(self.device)  # (1,)
        noise = randn_like(x0, generator)
        x_t = self.table.add_noise(x0, noise, t)
        # 4. frame-concat forward, context frames at the target's t
        latents = torch.cat([cond.context_latents, x_t], dim=2)  # (1, C, Nc + F, h, w)
        flags = frame_flags(cond, x0.shape[2])
        flow = self.teacher(latents, t, embeds, flags, torch.arange(flags.shape[0]))[:, :, cond.num_context :]
        # 5. weighted flow matching
        loss = flow_matching_loss(flow, noise, x0, self.table.training_weight(t))
        self.log("teacher/loss", loss, prog_bar=True)
        self.log("teacher/t", t.float().mean())
        return loss

    def text_uncond(self) -> torch.Tensor | None:
        """What text dropout replaces the captions with: `None` (zeros) or the negative prompt `(1, L, D)`."""
        return self.encoders.negative() if self.config.text_dropout_to == "negative_prompt" else None

    def configure_optimizers(self) -> torch.optim.Optimizer:
        opt = self.config.optimizer
        return adamw(self.teacher.parameters(), opt.lr, opt.betas, opt.weight_decay)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        clip_gradients(self, optimizer, self.config.optimizer.max_grad_norm)

    def exports(self, state_dict: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
        """Files for `callbacks.SafetensorsExport`: the teacher's weights (diffusers names)."""
        return {"teacher.safetensors": strip_prefix(state_dict, "teacher.")}
