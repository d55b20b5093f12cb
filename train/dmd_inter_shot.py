"""Stage 2.2.2: inter-shot self-forcing DMD on the student's own history, with LoRA (reference §5.5).

Same networks, losses and schedule as stage 2.2.1 (`dmd.py`), but every story is rolled out shot by shot:
  1. shot i's context is sampled (§4.3) from the student's *own decoded* earlier shots of this story (shot 0:
     zeros), VAE-encoded one frame at a time; 10 % context dropout still applies; captions 0..i;
  2. each shot is one optimisation step (generator if `step % generator_every == 0`, else critic); with
     several ranks, every rank trains the number of shots of the shortest story of the step. Lightning
     checks `max_steps` between stories, so a run may end up to `shots - 1` steps past it;
  3. that step's rollout (x0 at the random exit step, possibly a 1-step prediction: quirk 22) is decoded and
     appended to the history. No gradient crosses shots.
Only LoRA adapters train (peft via diffusers `add_adapter`, on every linear layer of every transformer block,
generator and critic). `merge_student_lora` folds the generator's adapters into its base weights.
Stage 2.2.2 starts from the stage 2.2.1 student (the reference's yaml points at the released model, quirk 9).
"""

from __future__ import annotations

import torch
from peft import LoraConfig
from safetensors.torch import load_file

from shotstream.checkpoint import merge_lora
from shotstream.context_sampling import ContextPlan, plan_context, reusable_frames, shot_ranges
from shotstream.sampling import ShotConditioning
from shotstream.transformer import ShotStreamTransformer

from .callbacks import strip_prefix
from .conditioning import drop_context, step_generator
from .config import LoRAConfig
from .data import StorySample
from .dmd import DMDDistillation


def block_linear_names(model: torch.nn.Module) -> list[str]:
    """Every `nn.Linear` inside the transformer blocks: attn1 / attn2 q, k, v, out and both FFN layers."""
    return [n for n, m in model.named_modules() if n.startswith("blocks.") and isinstance(m, torch.nn.Linear)]


def add_lora(model: ShotStreamTransformer, config: LoRAConfig) -> None:
    """Attach one LoRA adapter (B = 0 at init) per block linear; only adapter weights stay trainable."""
    lora = LoraConfig(
        r=config.rank, lora_alpha=config.alpha, lora_dropout=config.dropout, target_modules=block_linear_names(model)
    )
    model.add_adapter(lora)


def lora_tensors(state_dict: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The adapter weights under `prefix`, peft names without the adapter name (`...to_q.lora_A.weight`)."""
    own = strip_prefix(state_dict, prefix)
    return {k.replace(".default.", "."): v for k, v in own.items() if ".lora_A." in k or ".lora_B." in k}


def merge_student_lora(student: ShotStreamTransformer, lora_path: str, config: LoRAConfig) -> int:
    """Fold exported generator adapters into a plain student: `W += (alpha / r) B A` (§5.7)."""
    return merge_lora(student, load_file(lora_path), scale=config.alpha / config.rank)


class ShotHistory:
    """The decoded shots of the story so far; keeps only the frames a later shot can sample (§4.3)."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.lengths: list[int] = []
        self.frames: dict[int, torch.Tensor] = {}  # global pixel-frame index -> (3, H, W)

    def append(self, pixels: torch.Tensor) -> None:
        """Add a decoded shot `(1, 3, T, H, W)`."""
        start = sum(self.lengths)
        self.lengths.append(pixels.shape[2])
        keep = reusable_frames(shot_ranges(self.lengths), len(self.lengths) - 1, self.budget)
        self.frames.update({i: pixels[0, :, i - start] for i in keep})

    def plan(self) -> ContextPlan:
        return plan_context(shot_ranges(self.lengths), self.budget)

    def pixels(self, plan: ContextPlan) -> torch.Tensor:
        """The planned context frames `(Nc, 3, H, W)`."""
        return torch.stack([self.frames[index] for _, index in plan.frames])


class InterShotDMD(DMDDistillation):
    """Self-forcing DMD over whole stories on self-generated history, LoRA on generator and critic."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if self.config.lora is None:
            raise ValueError("inter-shot DMD trains LoRA adapters: set dmd_stage2.lora")
        add_lora(self.generator, self.config.lora)
        add_lora(self.critic, self.config.lora)

    def training_step(self, batch: StorySample, batch_idx: int) -> None:
        history = ShotHistory(self.preset.context_frames)
        for shot in range(self.shots_on_every_rank(len(batch.captions))):
            generator = step_generator(self.seed, self.global_step, self.global_rank)
            cond = self.conditioning(history, batch.captions[: shot + 1])
            latents = self.optimization_step(drop_context(cond, self.config.context_dropout, generator), generator)
            history.append(self.encoders.decode(latents))

    def shots_on_every_rank(self, num_shots: int) -> int:
        """The fewest shots of this step's stories over all ranks: every rank must step equally often."""
        count = torch.tensor(num_shots, device=self.device)
        return int(self.trainer.strategy.reduce(count, reduce_op="min"))

    def conditioning(self, history: ShotHistory, captions: list[str]) -> ShotConditioning:
        """Context of the next shot from the history (zeros for the first shot) and captions 0..k."""
        preset, plan = self.preset, history.plan()
        if plan.frames:
            latents = self.encoders.context(history.pixels(plan))  # (1, C, Nc, h, w)
        else:
            shape = (1, preset.vae.z_dim, preset.context_frames, preset.latent_height, preset.latent_width)
            latents = torch.zeros(shape, device=self.device)
        flags = torch.tensor(plan.flags, dtype=torch.int32)
        return ShotConditioning(latents, flags, plan.shot_flag, self.encoders.captions(captions))

    def exports(self, state_dict: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
        """Files for `callbacks.SafetensorsExport`: the generator's and the critic's adapters."""
        return {
            "generator_lora.safetensors": lora_tensors(state_dict, "generator."),
            "critic_lora.safetensors": lora_tensors(state_dict, "critic."),
        }
