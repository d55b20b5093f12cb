"""The ShotStream training recipe: every stage in order, each feeding the next (reference §5).

    python -m train.recipe --preset tiny --out runs/tiny
    python -m train.recipe --preset wan2.1-1.3b --out runs/wan --stages teacher ode_pairs

Stages and what they leave in `--out`:
  toy_data     toy world only: rendered stories             the training CSV at `data.csv_path`
  encoders     0    toy world only: tiny VAE + text encoder   the folder `encoders`
  vae_decoder  0    toy world only: the decoder fine-tuned    vae_decoder/: `encoders` with the new decoder
  latents           optional: every clip encoded once         latents/latents.safetensors (`data.latent_cache`)
  teacher      1    bidirectional next-shot teacher          teacher/teacher.safetensors
  ode_pairs    2.1a teacher ODE trajectories                  ode_pairs/*.safetensors
  ode          2.1b causal init by ODE regression             ode/student.safetensors
  dmd_stage1   2.2.1 intra-shot self-forcing DMD              dmd_stage1/generator.safetensors
  dmd_stage2   2.2.2 inter-shot self-forcing DMD, LoRA        dmd_stage2/generator_lora.safetensors
  export       LoRA merged into the student; the model folder `ShotStreamPipeline.from_pretrained` reads
After the teacher, ODE, DMD stage-1 and export stages, `samples/<stage>.mp4` shows the first story of the
training CSV made by that stage's model (seeded). A stage whose output exists is skipped; an interrupted
stage resumes from its `checkpoints/last.ckpt` (`ode_pairs`: from the pairs it wrote, so raising
`ode_pairs.max_pairs` samples only the new rows).
For the 1.3B preset the VAE / text encoder (`encoders`) and the training CSV (`data.csv_path`) are inputs;
the toy world makes both itself (stages `toy_data` and `encoders`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from collections.abc import Callable
from functools import cached_property
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import EMAWeightAveraging
from lightning.pytorch.utilities import rank_zero_only

from shotstream.pipeline import ShotStreamPipeline
from shotstream.presets import PRESETS, ShotStreamPreset, get_preset
from shotstream.video_io import write_mp4

from .conditioning import FrozenEncoders
from .config import DMDConfig, RecipeConfig, StepsConfig, load_config
from .data import MultiShotDataModule, read_rows
from .dmd import DMDDistillation
from .dmd_inter_shot import InterShotDMD, merge_student_lora
from .factory import build_predictor, build_trainer, build_transformer, load_encoders
from .latent_cache import write_latent_cache
from .ode import ODERegression
from .ode_pairs import ODEPairDataModule, ODEPairWriter, TeacherSampling, rows_to_sample
from .teacher import TeacherTuning
from .toy_encoders import (
    DecoderTuning,
    ShotFrames,
    VAETraining,
    VideoWindows,
    build_toy_text_encoder,
    finish_encoders,
    new_toy_vae,
    start_video_as_images,
    window_loader,
)
from .toy_export import export_stories

STAGES = (
    "toy_data",
    "encoders",
    "vae_decoder",
    "latents",
    "teacher",
    "ode_pairs",
    "ode",
    "dmd_stage1",
    "dmd_stage2",
    "export",
)
CONFIG_DIR = Path(__file__).parent / "configs"
SAMPLED = {"teacher": "teacher/teacher.safetensors", "ode": "ode/student.safetensors",
           "dmd_stage1": "dmd_stage1/generator.safetensors",
           "export": "model/transformer/diffusion_pytorch_model.safetensors"}  # fmt: skip


class Recipe:
    """Runs the stages of one `RecipeConfig` into an output folder."""

    def __init__(self, config: RecipeConfig, preset: ShotStreamPreset, out: Path) -> None:
        self.config, self.preset, self.out = config, preset, out

    @property
    def encoders_folder(self) -> Path:
        """The frozen VAE and text encoder: `vae_decoder/` (the same encoder, fine-tuned decoder) if in the recipe."""
        return self.out / "vae_decoder" if self.config.vae_decoder is not None else Path(self.config.encoders)

    @cached_property
    def encoders(self) -> FrozenEncoders:
        return load_encoders(self.encoders_folder, self.preset)

    def path(self, stage: str, filename: str) -> Path:
        return self.out / stage / filename

    def data(self, stories_only: bool, predict_rows: list[int] | None = None) -> MultiShotDataModule:
        cfg = self.config
        cache = self.path("latents", "latents.safetensors") if cfg.data.latent_cache else None
        return MultiShotDataModule(
            cfg.data.csv_path, self.preset, stories_only, cfg.seed, cfg.data.num_workers, cache, predict_rows
        )

    def transformer(self, weights: Path | str | None):
        return build_transformer(self.preset, weights, self.config.system.gradient_checkpointing, self.config.seed)

    def fit(
        self, module: L.LightningModule, data: L.LightningDataModule, stage: str, steps: StepsConfig,
        ema_decay: float | None = None,
    ) -> None:  # fmt: skip
        ema = [] if ema_decay is None else [EMAWeightAveraging(decay=ema_decay)]
        trainer = build_trainer(self.config.system, steps, self.out / stage, ema)
        trainer.fit(module, datamodule=data, ckpt_path="last")

    def toy_data(self) -> None:
        toy, csv_path = self.config.toy_data, Path(self.config.data.csv_path)
        export_stories(csv_path.parent, toy.stories, self.config.seed, toy.min_shots, toy.max_shots, self.preset.width)
        if not csv_path.is_file():
            raise FileNotFoundError(f"train.toy_export wrote no {csv_path}: data.csv_path must end in data.csv")

    def train_encoders(self) -> None:
        """Stage 0: train the tiny VAE on images, then on windows; write it with the random text encoder."""
        cfg, stage, folder = self.config, self.config.encoders_stage, self.out / "encoders"
        vae = new_toy_vae(self.preset, cfg.seed)
        if not (folder / "video" / "checkpoints" / "last.ckpt").exists():  # else the video fit resumes from it
            images = VAETraining(vae, stage.image_optimizer, stage.kl_weight, decoder_from=None, seed=cfg.seed)
            image_steps = dataclasses.replace(stage.steps, max_steps=stage.image_steps)
            frames = window_loader(ShotFrames(cfg.data.csv_path, self.preset), stage.image_batch_size, cfg.seed, 0)
            build_trainer(cfg.system, image_steps, folder / "images").fit(images, frames, ckpt_path="last")
            start_video_as_images(vae)
        decoder_from = stage.steps.max_steps - stage.decoder_steps
        video = VAETraining(vae, stage.optimizer, stage.kl_weight, decoder_from, cfg.seed)
        trainer = build_trainer(cfg.system, stage.steps, folder / "video")
        windows = VideoWindows(cfg.data.csv_path, self.preset, stage.clip_frames)
        loader = window_loader(windows, stage.batch_size, cfg.seed, cfg.data.num_workers)
        trainer.fit(video, loader, ckpt_path="last")
        if trainer.is_global_zero:
            text = build_toy_text_encoder(self.preset, cfg.seed)
            finish_encoders(vae, text, windows, Path(cfg.encoders))
        trainer.strategy.barrier("encoders")

    def tune_decoder(self) -> None:
        """Stage 0b: fine-tune the decoder of `encoders` alone; write the result as a full encoders folder."""
        cfg, stage = self.config, self.config.vae_decoder
        given = load_encoders(cfg.encoders, self.preset)
        windows = VideoWindows(cfg.data.csv_path, self.preset, stage.clip_frames)
        module = DecoderTuning(given.vae.vae, stage, cfg.seed)
        trainer = build_trainer(cfg.system, stage.steps, self.out / "vae_decoder")
        trainer.fit(
            module,
            train_dataloaders=window_loader(windows, stage.batch_size, cfg.seed, cfg.data.num_workers),
            ckpt_path="last",
        )
        given.text_encoder.save_pretrained(self.encoders_folder)
        module.vae.save_pretrained(self.encoders_folder / "vae")  # last: its config.json marks the stage done

    def latents(self) -> None:
        """Encode every training clip once (`train.latent_cache`); later stages read latents, not mp4s."""
        path = self.path("latents", "latents.safetensors")
        cfg = self.config
        write_latent_cache(cfg.data.csv_path, self.preset, self.encoders, path, 4, cfg.data.num_workers)

    def teacher(self) -> None:
        cfg = self.config
        module = TeacherTuning(
            self.transformer(cfg.teacher.init_weights), self.encoders, self.preset, cfg.teacher, cfg.seed,
            cfg.system.round_timesteps_to_bf16,
        )  # fmt: skip
        self.fit(module, self.data(stories_only=False), "teacher", cfg.teacher.steps, cfg.teacher.ema_decay)

    def ode_pairs(self) -> None:
        """Teacher trajectories for the first `max_pairs` rows; rows that already have a pair are skipped."""
        cfg, folder = self.config, self.out / "ode_pairs"
        rows = rows_to_sample(folder, cfg.ode_pairs.max_pairs, len(read_rows(cfg.data.csv_path)))
        print(f"[recipe] ode_pairs: {len(rows)} clips to sample into {folder}")
        module = TeacherSampling(self.transformer(self.path("teacher", "teacher.safetensors")), self.encoders,
                                 self.preset, cfg.seed, cfg.ode_pairs.first_shot_fraction)  # fmt: skip
        per_device = math.ceil(len(rows) / (cfg.system.devices * cfg.system.num_nodes))
        trainer = build_predictor(cfg.system, folder, per_device, [ODEPairWriter(folder)])
        if rows:
            trainer.predict(module, datamodule=self.data(False, rows), return_predictions=False)
        trainer.strategy.barrier("ode_pairs")
        if trainer.is_global_zero:
            (folder / "COMPLETE").touch()

    def ode(self) -> None:
        cfg = self.config
        student = self.transformer(self.path("teacher", "teacher.safetensors"))  # same names as the teacher
        module = ODERegression(student, self.encoders, self.preset, cfg.ode, cfg.seed)
        data = ODEPairDataModule(self.out / "ode_pairs", cfg.seed, cfg.data.num_workers)
        self.fit(module, data, "ode", cfg.ode.steps)

    def dmd(self, module_class: type[DMDDistillation], stage: str, config: DMDConfig, start: Path) -> None:
        """A DMD stage: generator from `start`, real score and critic from the teacher."""
        cfg, teacher = self.config, self.path("teacher", "teacher.safetensors")
        module = module_class(
            self.transformer(start), self.transformer(teacher), self.transformer(teacher), self.encoders,
            self.preset, config, cfg.seed, cfg.system.round_timesteps_to_bf16,
        )  # fmt: skip
        self.fit(module, self.data(stories_only=module_class is InterShotDMD), stage, config.steps)

    def dmd_stage1(self) -> None:
        self.dmd(DMDDistillation, "dmd_stage1", self.config.dmd_stage1, self.path("ode", "student.safetensors"))

    def dmd_stage2(self) -> None:
        start = self.path("dmd_stage1", "generator.safetensors")  # not the released model (quirk 9)
        self.dmd(InterShotDMD, "dmd_stage2", self.config.dmd_stage2, start)

    def export(self) -> None:
        """Merge the stage-2.2.2 generator adapters into the stage-2.2.1 student and write the model folder."""
        student = self.transformer(self.path("dmd_stage1", "generator.safetensors"))
        lora = self.path("dmd_stage2", "generator_lora.safetensors")
        merge_student_lora(student, str(lora), self.config.dmd_stage2.lora)
        pipeline = ShotStreamPipeline(self.preset, student, self.encoders.vae, self.encoders.text_encoder)
        pipeline.save_pretrained(self.out / "model")

    @rank_zero_only
    @torch.no_grad()
    def sample(self, stage: str) -> None:
        """`samples/<stage>.mp4`: the first story of the training CSV by the stage's model (teacher: 50 steps, CFG)."""
        path = self.out / "samples" / f"{stage}.mp4"
        if stage not in SAMPLED or path.exists():
            return
        row, seed = read_rows(self.config.data.csv_path)[0], self.config.seed
        story = json.loads(row.json_path.read_text())
        prompts = [story[f"shot{i + 1}"] for i in range(min(len(row.shots), self.preset.max_shots))]
        model = self.transformer(self.out / SAMPLED[stage])
        pipe = ShotStreamPipeline(self.preset, model, self.encoders.vae, self.encoders.text_encoder)
        if stage == "teacher":
            state, generator = pipe.new_story(story["global_caption"], seed), torch.Generator().manual_seed(seed)
            steps = self.preset.teacher_steps
            video = np.concatenate([pipe.teacher_shot(state, p, model, generator, steps) for p in prompts])
        else:
            video = pipe.generate_story(story["global_caption"], prompts, seed)[1]
        path.parent.mkdir(parents=True, exist_ok=True)
        write_mp4(video, path)
        print(f"[recipe] {stage}: sample video {path}")

    def stages(self) -> dict[str, tuple[Callable[[], None], Path]]:
        """Stage name -> (runner, the output that marks it done)."""
        cfg = self.config
        return {
            "toy_data": (self.toy_data, Path(cfg.data.csv_path)),
            "encoders": (self.train_encoders, Path(cfg.encoders) / "vae" / "config.json"),
            "vae_decoder": (self.tune_decoder, self.path("vae_decoder", "vae/config.json")),
            "latents": (self.latents, self.path("latents", "latents.safetensors")),
            "teacher": (self.teacher, self.path("teacher", "teacher.safetensors")),
            "ode_pairs": (self.ode_pairs, self.path("ode_pairs", "COMPLETE")),
            "ode": (self.ode, self.path("ode", "student.safetensors")),
            "dmd_stage1": (self.dmd_stage1, self.path("dmd_stage1", "generator.safetensors")),
            "dmd_stage2": (self.dmd_stage2, self.path("dmd_stage2", "generator_lora.safetensors")),
            "export": (self.export, self.path("model", "shotstream.json")),
        }

    def run(self, names: list[str]) -> None:
        cfg, stages = self.config, self.stages()
        not_in_recipe = {
            "toy_data": cfg.toy_data is None,
            "encoders": cfg.encoders_stage is None,
            "vae_decoder": cfg.vae_decoder is None,
            "latents": not cfg.data.latent_cache,
        }
        for name in names:
            runner, output = stages[name]
            if not_in_recipe.get(name, False):
                print(f"[recipe] {name}: not part of this {self.preset.name} recipe, skipped")
                continue
            if output.exists():
                print(f"[recipe] {name}: {output} exists, skipped")
                self.sample(name)
                continue
            if name in not_in_recipe and cfg.system.devices * cfg.system.num_nodes != 1:
                raise ValueError(f"stage {name} runs in one process: run it with devices: 1, num_nodes: 1 first")
            print(f"[recipe] {name}: running")
            runner()
            self.sample(name)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", required=True, choices=sorted(PRESETS))
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--config", type=Path, help="recipe YAML (default: train/configs/<preset>.yaml)")
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
    args = parser.parse_args(argv)
    config = load_config(args.config or CONFIG_DIR / f"{args.preset}.yaml")
    if config.preset != args.preset:
        parser.error(f"{args.config} is a config for preset {config.preset!r}")
    Recipe(config, get_preset(config.preset), args.out).run(args.stages)


if __name__ == "__main__":
    main()
