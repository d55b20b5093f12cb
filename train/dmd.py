"""Stage 2.2.1: intra-shot self-forcing DMD on ground-truth history (reference §5.4).

Three networks: the causal student (generator, from the ODE init), the frozen teacher as the real score,
and a critic (fake score) initialised from the teacher. Manual optimisation in the shape of Lightning's
GAN example; every optimisation step is **either** a generator step (`step % generator_every == 0`, the
reference's 6) **or** a critic step, so the critic gets 5 updates per generator update.

Generator step (DMD, eqs. 7-8):
  1. self-forcing rollout of a whole shot with gradient at the exit step (`self_forcing.py`);
  2. `t = clamp(timesteps[U{0..999}], 20, 980)` (bf16-rounded under bf16), `x_t = add_noise(x, eps, t)`;
  3. real score with captions and with the negative prompt, critic with captions, all on
     `[context ; x_t]` with the same t for the context frames (quirk 19), x0 of the generated frames;
  4. `0.5 MSE(x, sg(x - grad))`, `grad = (fake - real) / mean|x - real|`, `real = c + g (c - u)`.
Critic step: a rollout without gradient, its own t and eps, flow-matching loss of the critic on `x_t`.
Context dropout 10 %; no text dropout. The rollout always makes `frames_per_shot` latent frames and the
flags follow it (the reference builds them from the ground-truth length, quirk 21).
"""

from __future__ import annotations

import lightning as L
import torch

from shotstream.presets import ShotStreamPreset
from shotstream.sampling import ShotConditioning
from shotstream.scheduler import FlowMatchTable
from shotstream.transformer import ShotStreamTransformer

from .callbacks import strip_prefix
from .conditioning import (
    FrozenEncoders,
    drop_context,
    frame_flags,
    randn_like,
    sample_timesteps,
    step_generator,
)
from .config import DMDConfig
from .data import ClipSample
from .losses import critic_flow_loss, dmd_generator_loss
from .optim import adamw, clip_gradients
from .self_forcing import Rollout, self_forcing_rollout


class DMDDistillation(L.LightningModule):
    """Self-forcing distribution matching distillation of the causal student (see module docstring)."""

    def __init__(
        self,
        generator: ShotStreamTransformer,
        real_score: ShotStreamTransformer,
        critic: ShotStreamTransformer,
        encoders: FrozenEncoders,
        preset: ShotStreamPreset,
        config: DMDConfig,
        seed: int,
        round_timesteps_to_bf16: bool,
    ) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.generator = generator.requires_grad_(True)
        self.critic = critic.requires_grad_(True)
        self.real_score = real_score.eval().requires_grad_(False)
        self.encoders, self.preset, self.config, self.seed = encoders, preset, config, seed
        self.round_timesteps_to_bf16 = round_timesteps_to_bf16
        self.table = FlowMatchTable(preset.timestep_shift)
        self.student_timesteps = self.table.warp(preset.denoising_steps)  # (4,) 1000, 957.93, 888.89, 737.59

    def on_fit_start(self) -> None:
        self.encoders.to(self.device)

    def training_step(self, batch: ClipSample, batch_idx: int) -> None:
        generator = step_generator(self.seed, self.global_step, self.global_rank)
        cond = drop_context(self.encoders.clip_conditioning(batch), self.config.context_dropout, generator)
        self.optimization_step(cond, generator)

    def optimization_step(self, cond: ShotConditioning, generator: torch.Generator) -> torch.Tensor:
        """One generator or critic update; returns the rollout's latents `(1, C, F, h, w)`, detached."""
        generator_optimizer, critic_optimizer = self.optimizers()
        if self.global_step % self.config.generator_every == 0:
            return self.generator_step(cond, generator_optimizer, generator)
        return self.critic_step(cond, critic_optimizer, generator)

    def generator_step(self, cond: ShotConditioning, optimizer, generator: torch.Generator) -> torch.Tensor:
        with self.toggled_optimizer(optimizer):
            rollout = self.rollout(cond, generator, with_grad=True)
            real_cond, real_uncond, fake = self.scores(rollout.latents.detach(), cond, generator)
            loss = dmd_generator_loss(rollout.latents, real_cond, real_uncond, fake, self.preset.real_score_guidance)
            self.update(optimizer, loss, self.config.generator_optimizer.max_grad_norm)
        self.log_dict({"dmd/generator_loss": loss.float(), "dmd/exit_step": float(rollout.exit_step)})
        return rollout.latents.detach()

    def critic_step(self, cond: ShotConditioning, optimizer, generator: torch.Generator) -> torch.Tensor:
        with self.toggled_optimizer(optimizer):
            with torch.no_grad():
                x = self.rollout(cond, generator, with_grad=False).latents
                t = self.score_timestep(generator)
                noise = randn_like(x, generator)
                x_t = self.table.add_noise(x, noise, t)
            flow = self.score_flow(self.critic, x_t, t, cond, cond.caption_embeds)
            loss = critic_flow_loss(flow, noise, x)
            self.update(optimizer, loss, self.config.critic_optimizer.max_grad_norm)
        self.log("dmd/critic_loss", loss, prog_bar=True)
        return x

    def rollout(self, cond: ShotConditioning, generator: torch.Generator, with_grad: bool) -> Rollout:
        """A self-forcing rollout of one shot; the exit step is drawn identically on every rank."""
        shared = step_generator(self.seed, self.global_step, rank=0)
        exit_step = int(torch.randint(0, len(self.student_timesteps), (), generator=shared))
        preset = self.preset
        return self_forcing_rollout(
            self.generator, self.table, self.student_timesteps, cond,
            preset.frames_per_shot, preset.frames_per_chunk, exit_step, generator, with_grad,
        )  # fmt: skip

    def update(self, optimizer, loss: torch.Tensor, max_grad_norm: float) -> None:
        """Backward, clip, step; gradients are then dropped so the other model's clip never sees them."""
        optimizer.zero_grad()
        self.manual_backward(loss)
        clip_gradients(self, optimizer, max_grad_norm)
        optimizer.step()
        optimizer.zero_grad()

    def score_timestep(self, generator: torch.Generator) -> torch.Tensor:
        """`clamp(timesteps[U{0..999}], min, max)` `(1,)` on the module's device."""
        t = sample_timesteps(self.table, 1, generator, self.round_timesteps_to_bf16)
        return t.clamp(self.config.min_timestep, self.config.max_timestep).to(self.device)

    def score_flow(
        self, model: ShotStreamTransformer, x_t: torch.Tensor, t: torch.Tensor, cond: ShotConditioning, embeds
    ) -> torch.Tensor:
        """A bidirectional score on `[context ; x_t]`, every frame at t: flow of the generated frames."""
        latents = torch.cat([cond.context_latents, x_t], dim=2)
        flags = frame_flags(cond, x_t.shape[2])
        return model(latents, t, embeds, flags, torch.arange(flags.shape[0]))[:, :, cond.num_context :]

    @torch.no_grad()
    def scores(
        self, x: torch.Tensor, cond: ShotConditioning, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x0 predictions of real (captions), real (negative prompt) and critic (captions) at a random t."""
        t = self.score_timestep(generator)
        x_t = self.table.add_noise(x, randn_like(x, generator), t)

        def x0(model: ShotStreamTransformer, embeds: torch.Tensor) -> torch.Tensor:
            return self.table.flow_to_x0(self.score_flow(model, x_t, t, cond, embeds), x_t, t)

        captions, negative = cond.caption_embeds, self.encoders.negative()
        return x0(self.real_score, captions), x0(self.real_score, negative), x0(self.critic, captions)

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        gen, critic = self.config.generator_optimizer, self.config.critic_optimizer
        return [
            adamw(self.generator.parameters(), gen.lr, gen.betas, gen.weight_decay),
            adamw(self.critic.parameters(), critic.lr, critic.betas, critic.weight_decay),
        ]

    def exports(self, state_dict: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
        """Files for `callbacks.SafetensorsExport`: the distilled student and its critic."""
        return {
            "generator.safetensors": strip_prefix(state_dict, "generator."),
            "critic.safetensors": strip_prefix(state_dict, "critic."),
        }
