"""Stage 2.1a: ODE pairs sampled from the teacher (reference `Teacher_Ode_Sample.py`, §5.2).

For every training clip the teacher runs its 50-step Euler sampler with CFG 6 (negative prompt as the
unconditional branch) on ground-truth context, from noise of the ground-truth target length. The latents
*before* the steps whose timesteps are the student's warped steps (steps 0, 13, 25, 37 of 50: t = 1000,
957.93, 888.89, 737.59) and the final sample are saved: the ODE trajectory the student regresses on.
A seeded share of rows (`first_shot_fraction`; reference 0, tiny 0.25) is sampled as its story's first shot
instead (`as_first_shot`: no context, the first caption alone), the one shot next-shot clips never show.

Sampling is a Lightning `predict` run (`TeacherSampling` + `ODEPairWriter`), so it shards over devices.
One `.safetensors` file per clip, named by CSV row (`pair_path`) and written atomically, so a killed run
resumes by sampling only the rows without a file (`rows_to_sample`); a clip's noise is seeded by its row,
so a resumed or enlarged set holds the same pairs as one run from scratch. `ODEPairDataModule` reads a
folder of them back.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import DataLoader, Dataset

from shotstream.presets import ShotStreamPreset
from shotstream.sampling import ShotConditioning, teacher_sample
from shotstream.scheduler import EulerSampler, FlowMatchTable
from shotstream.transformer import ShotStreamTransformer

from .conditioning import FrozenEncoders, randn_like, step_generator, without_context
from .data import ClipSample, EpochShuffle, collate_one


@dataclass
class ODEPair:
    """One teacher trajectory with its conditioning."""

    context_latents: torch.Tensor  # (1, C, Nc, h, w) ground-truth context latents
    context_flags: torch.Tensor  # (Nc,) int32
    shot_flag: int  # flag of the target frames
    trajectory: torch.Tensor  # (1, K + 1, C, F, h, w): inputs of the K recorded steps, then the final x0
    timesteps: torch.Tensor  # (K + 1,) float32 timesteps of the trajectory entries (the last is 0)
    captions: list[str]
    index: int  # CSV row of the clip

    def save(self, path: str | Path) -> None:
        """Writes `path` atomically (a temporary file renamed), so a killed run leaves no half-written pair."""
        tensors = {
            "context_latents": self.context_latents,
            "context_flags": self.context_flags.int(),
            "trajectory": self.trajectory,
            "timesteps": self.timesteps,
        }
        tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
        metadata = {"captions": json.dumps(self.captions), "shot_flag": str(self.shot_flag), "index": str(self.index)}
        partial = Path(path).with_suffix(".partial")
        save_file(tensors, str(partial), metadata=metadata)
        partial.replace(path)

    @classmethod
    def load(cls, path: str | Path) -> ODEPair:
        with safe_open(str(path), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a mapping)
            metadata = f.metadata()
        return cls(
            **tensors,
            shot_flag=int(metadata["shot_flag"]),
            captions=json.loads(metadata["captions"]),
            index=int(metadata["index"]),
        )


def pair_path(folder: str | Path, index: int) -> Path:
    """The file of the ODE pair of CSV row `index`."""
    return Path(folder) / f"{index:06d}.safetensors"


def rows_to_sample(folder: str | Path, max_pairs: int, num_rows: int) -> list[int]:
    """The first `max_pairs` CSV rows that have no ODE-pair file in `folder` yet."""
    return [i for i in range(min(max_pairs, num_rows)) if not pair_path(folder, i).exists()]


def recorded_steps(sampler: EulerSampler, student_timesteps: torch.Tensor) -> tuple[int, ...]:
    """Teacher steps whose timestep equals each student step (steps 0, 13, 25, 37 of 50 for the reference)."""
    steps = [int((sampler.timesteps - t).abs().argmin()) for t in student_timesteps]
    if not torch.allclose(sampler.timesteps[steps], student_timesteps, atol=1e-2):
        raise ValueError(
            f"the teacher's {len(sampler.timesteps)}-step schedule has no steps at {student_timesteps.tolist()}"
        )
    return tuple(steps)


class TeacherSampling(L.LightningModule):
    """`predict_step`: one clip -> one `ODEPair` (no training)."""

    def __init__(
        self, teacher: ShotStreamTransformer, encoders: FrozenEncoders, preset: ShotStreamPreset, seed: int,
        first_shot_fraction: float,
    ) -> None:  # fmt: skip
        super().__init__()
        self.teacher = teacher.eval().requires_grad_(False)
        self.encoders, self.seed, self.guidance = encoders, seed, preset.teacher_guidance
        self.first_shot_fraction = first_shot_fraction
        self.sampler = EulerSampler(preset.teacher_steps, preset.timestep_shift)
        self.student_timesteps = FlowMatchTable(preset.timestep_shift).warp(preset.denoising_steps)
        self.record = recorded_steps(self.sampler, self.student_timesteps)

    def on_predict_start(self) -> None:
        self.encoders.to(self.device)

    def predict_step(self, batch: ClipSample, batch_idx: int) -> ODEPair:
        cond, captions = self.encoders.clip_conditioning(batch), batch.captions
        if torch.rand((), generator=step_generator(self.seed, batch.index, 1)) < self.first_shot_fraction:
            cond, captions = as_first_shot(cond), captions[:1]
        x0 = self.encoders.clip_target(batch)  # (1, C, F, h, w): only its shape is used
        noise = randn_like(x0, step_generator(self.seed, batch.index, 0))
        sample, recorded = teacher_sample(
            self.teacher, self.sampler, cond, self.encoders.negative(), noise, self.guidance, self.record
        )
        trajectory = torch.stack([recorded[s] for s in self.record] + [sample], dim=1)  # (1, K + 1, C, F, h, w)
        return ODEPair(
            context_latents=cond.context_latents,
            context_flags=cond.context_flags,
            shot_flag=cond.shot_flag,
            trajectory=trajectory,
            timesteps=torch.cat([self.student_timesteps, torch.zeros(1)]),
            captions=captions,
            index=batch.index,
        )


def as_first_shot(cond: ShotConditioning) -> ShotConditioning:
    """The conditioning of a story's first shot at inference: zero context and flags, flag 1, caption 0 alone."""
    first = without_context(cond)
    return dataclasses.replace(first, caption_embeds=first.caption_embeds[:1])  # one caption routes to every frame


class ODEPairWriter(BasePredictionWriter):
    """Writes each predicted `ODEPair` to `pair_path(folder, index)` as soon as it is made."""

    def __init__(self, folder: str | Path) -> None:
        super().__init__(write_interval="batch")
        self.folder = Path(folder)

    def write_on_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        prediction: ODEPair,
        batch_indices: Sequence[int] | None,
        batch: ClipSample,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        prediction.save(pair_path(self.folder, prediction.index))


class ODEPairDataset(Dataset):
    """A folder of ODE-pair files."""

    def __init__(self, folder: str | Path) -> None:
        self.paths = sorted(Path(folder).glob("*.safetensors"))
        if not self.paths:
            raise FileNotFoundError(f"no ODE pairs (*.safetensors) in {folder}; run the ode_pairs stage first")

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> ODEPair:
        return ODEPair.load(self.paths[index])


class ODEPairDataModule(L.LightningDataModule):
    def __init__(self, folder: str | Path, seed: int, num_workers: int) -> None:
        super().__init__()
        self.folder, self.seed, self.num_workers = folder, seed, num_workers

    def train_dataloader(self) -> DataLoader:
        dataset = ODEPairDataset(self.folder)
        sampler = EpochShuffle(len(dataset), self.seed)
        return DataLoader(dataset, batch_size=1, sampler=sampler, collate_fn=collate_one, num_workers=self.num_workers)
