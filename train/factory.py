"""Construction of models, encoders and Lightning trainers from a preset and a `RecipeConfig`."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from diffusers import AutoencoderKLWan
from lightning.pytorch.callbacks import Callback, TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, Strategy
from torch.distributed.fsdp import MixedPrecision

from shotstream.checkpoint import load_transformer_weights
from shotstream.presets import ShotStreamPreset
from shotstream.text import TextEncoder
from shotstream.transformer import ShotStreamBlock, ShotStreamTransformer
from shotstream.vae import VideoVAE

from .callbacks import PeriodicCheckpoint, SafetensorsExport
from .conditioning import FrozenEncoders
from .config import StepsConfig, SystemConfig


def build_transformer(
    preset: ShotStreamPreset, weights: str | Path | None, gradient_checkpointing: bool, seed: int
) -> ShotStreamTransformer:
    """A transformer of the preset's size, from `weights` (any format `shotstream.checkpoint` reads) or random."""
    torch.manual_seed(seed)
    model = ShotStreamTransformer.from_preset(preset.transformer)
    if weights is not None:
        load_transformer_weights(model, weights)
    if gradient_checkpointing:
        model.enable_gradient_checkpointing()
    return model


def load_encoders(folder: str | Path, preset: ShotStreamPreset) -> FrozenEncoders:
    """VAE and text encoder from a diffusers-layout folder (`vae/`, `text_encoder/`, `tokenizer/`)."""
    vae = AutoencoderKLWan.from_pretrained(str(folder), subfolder="vae", local_files_only=True)
    text = TextEncoder.from_pretrained(folder, max_length=preset.text_encoder.max_length, local_files_only=True)
    return FrozenEncoders(VideoVAE(vae), text, preset.negative_prompt)


def build_strategy(system: SystemConfig) -> Strategy:
    """DDP (toy world) or FSDP wrapping every `ShotStreamBlock` (1.3B, reference hybrid sharding)."""
    if system.ddp is not None:
        return DDPStrategy(find_unused_parameters=system.ddp.find_unused_parameters)
    fsdp = system.fsdp
    dtypes = {"bfloat16": torch.bfloat16, "float32": torch.float32}
    return FSDPStrategy(
        auto_wrap_policy={ShotStreamBlock},
        sharding_strategy=fsdp.sharding_strategy,
        state_dict_type=fsdp.state_dict_type,
        mixed_precision=MixedPrecision(
            param_dtype=dtypes[fsdp.param_dtype],
            reduce_dtype=dtypes[fsdp.reduce_dtype],
            buffer_dtype=dtypes[fsdp.reduce_dtype],
        ),
    )


def _system_kwargs(system: SystemConfig) -> dict:
    """Trainer arguments that come from the system config (shared by fit and predict trainers)."""
    return dict(
        accelerator=system.accelerator,
        devices=system.devices,
        num_nodes=system.num_nodes,
        precision=system.precision,
        strategy=build_strategy(system),
    )


def build_trainer(
    system: SystemConfig, steps: StepsConfig, stage_dir: Path, extra_callbacks: list[Callback] | None = None
) -> L.Trainer:
    """A stage's trainer: `last.ckpt` in `stage_dir/checkpoints`, exports in `stage_dir`, CSV logs.

    `extra_callbacks` run first, so that an `EMAWeightAveraging` has put the averaged weights into the
    module before `SafetensorsExport` writes them.
    """
    callbacks = [
        *(extra_callbacks or []),
        PeriodicCheckpoint(stage_dir / "checkpoints", steps.checkpoint_every),
        SafetensorsExport(stage_dir),
        TQDMProgressBar(),
    ]
    return L.Trainer(
        **_system_kwargs(system),
        max_steps=steps.max_steps,
        max_epochs=-1,
        log_every_n_steps=steps.log_every,
        logger=CSVLogger(stage_dir, name="logs"),
        callbacks=callbacks,
        default_root_dir=stage_dir,
        num_sanity_val_steps=0,
        enable_model_summary=False,
    )


def build_predictor(system: SystemConfig, stage_dir: Path, max_batches: int, callbacks: list[Callback]) -> L.Trainer:
    """A `predict` trainer (teacher sampling of ODE pairs) over at most `max_batches` clips per device."""
    return L.Trainer(
        **_system_kwargs(system),
        limit_predict_batches=max_batches,
        logger=False,
        callbacks=[TQDMProgressBar(), *callbacks],
        default_root_dir=stage_dir,
        enable_model_summary=False,
    )
