"""Typed training configuration: one YAML file per preset, one section per stage, loaded into dataclasses.

Every field is required in the YAML (no hidden defaults); unknown keys, missing keys and wrong types are
`ValueError`s naming the offending key. Size-dependent numbers (resolution, frames, denoising steps, guidance
scales, negative prompt) come from the `shotstream.presets` table, not from here.

    config = load_config("train/configs/tiny.yaml")
    config.teacher.optimizer.lr
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import yaml


@dataclass(frozen=True)
class OptimizerConfig:
    """AdamW and gradient-norm clipping (reference §5.6)."""

    lr: float
    betas: tuple[float, float]
    weight_decay: float
    max_grad_norm: float


@dataclass(frozen=True)
class StepsConfig:
    """Length and bookkeeping of one stage. In the DMD stages every generator or critic update is a step."""

    max_steps: int
    checkpoint_every: int  # optimizer steps between `last.ckpt` refreshes
    log_every: int


@dataclass(frozen=True)
class DDPConfig:
    find_unused_parameters: bool  # the DMD stages update generator and critic in turn


@dataclass(frozen=True)
class FSDPConfig:
    """Lightning `FSDPStrategy`, wrapping every `ShotStreamBlock` (reference: FSDP hybrid, bf16 params)."""

    sharding_strategy: Literal["FULL_SHARD", "SHARD_GRAD_OP", "HYBRID_SHARD", "NO_SHARD"]
    state_dict_type: Literal["full", "sharded"]
    param_dtype: Literal["bfloat16", "float32"]
    reduce_dtype: Literal["bfloat16", "float32"]


@dataclass(frozen=True)
class SystemConfig:
    """Hardware and distribution. Exactly one of `ddp` / `fsdp` is set."""

    accelerator: str
    devices: int
    num_nodes: int
    precision: str  # Lightning precision, e.g. "32-true", "bf16-mixed"
    gradient_checkpointing: bool
    ddp: DDPConfig | None
    fsdp: FSDPConfig | None

    def __post_init__(self) -> None:
        if (self.ddp is None) == (self.fsdp is None):
            raise ValueError("system: set exactly one of `ddp` and `fsdp`")

    @property
    def round_timesteps_to_bf16(self) -> bool:
        """The reference casts sampled timesteps to the compute dtype (bf16 under mixed precision, §2)."""
        return self.precision.startswith("bf16")


@dataclass(frozen=True)
class DataConfig:
    csv_path: str  # reference training CSV (§7); relative paths inside it resolve against its folder
    num_workers: int
    latent_cache: bool  # encode the clips once (stage `latents`, `train/latent_cache.py`) instead of every step


@dataclass(frozen=True)
class ToyDataConfig:
    """Toy world only: stories rendered by `train.toy_export` into the folder of `data.csv_path`."""

    stories: int
    min_shots: int
    max_shots: int


@dataclass(frozen=True)
class EncodersStageConfig:
    """Stage 0, toy world only: train the tiny VAE (the text encoder is a fixed random UMT5).

    Two fits: `image_steps` on single frames (`image_batch_size` scenes a step, `image_optimizer`), then
    `steps` on windows of `clip_frames` frames, started with the video path equal to the image path.
    """

    image_batch_size: int  # frames per image step, each from anywhere in the training videos
    image_steps: int  # the first fit: the spatial path, ~20x cheaper per step than a 33-frame window
    image_optimizer: OptimizerConfig
    clip_frames: int  # 4k + 1 frames per training window of the video fit
    batch_size: int  # windows per video step (on CPU, batches of >= 2 take oneDNN's conv3d: ~3x the windows/s of 1)
    decoder_steps: int  # the last video steps train the decoder alone on the frozen encoder's posterior means
    kl_weight: float
    optimizer: OptimizerConfig
    steps: StepsConfig  # the video fit


@dataclass(frozen=True)
class DecoderStageConfig:
    """Toy world only: fine-tune the VAE decoder alone on the frozen encoder's posterior means.

    The latent space is unchanged, so every stage trained on it stays valid (as Stable Diffusion's decoder
    fine-tunes); the recipe decodes with this decoder from then on.
    """

    clip_frames: int  # 4k + 1 frames per window, a whole shot: trained on 9, the causal decoder drifts over 33
    batch_size: int  # windows per step
    image_steps: int  # the first steps train on every 4th frame as 1-frame clips (many images per step)
    optimizer: OptimizerConfig
    steps: StepsConfig


@dataclass(frozen=True)
class TeacherConfig:
    """Stage 1, bidirectional next-shot teacher (§5.1)."""

    init_weights: str | None  # Wan2.1 weights for the 1.3B preset; None = random init (toy world)
    trainable: Literal["self_attn", "all"]  # reference `only_train3d: True` = self-attention only
    context_dropout: float
    text_dropout: float
    text_dropout_to: Literal["zeros", "negative_prompt"]  # reference: zeros; the CFG uncond is the negative prompt
    ema_decay: float | None  # EMA of the weights, exported instead of the last step (toy world); None = off (§5.6)
    optimizer: OptimizerConfig
    steps: StepsConfig


@dataclass(frozen=True)
class ODEPairsConfig:
    """Stage 2.1a, teacher sampling of ODE trajectories (§5.2); steps and CFG scale come from the preset."""

    max_pairs: int  # clips of the training CSV to sample (reference: ~5K)
    # share of pairs sampled as a story's first shot (no context, its caption alone), as the student meets shot 1
    # at inference; reference: 0 (next-shot clips only)
    first_shot_fraction: float


@dataclass(frozen=True)
class ODEConfig:
    """Stage 2.1b, causal initialisation by ODE regression (§5.3)."""

    text_dropout: float
    optimizer: OptimizerConfig
    steps: StepsConfig


@dataclass(frozen=True)
class LoRAConfig:
    """LoRA on every linear layer of every transformer block (§5.5: rank 256, alpha 256, no dropout)."""

    rank: int
    alpha: float
    dropout: float


@dataclass(frozen=True)
class DMDConfig:
    """Stages 2.2.1 (intra-shot, `lora: null`) and 2.2.2 (inter-shot, with LoRA) (§5.4, §5.5)."""

    generator_every: int  # a generator step when `step % generator_every == 0`, else a critic step (6)
    context_dropout: float
    min_timestep: float  # score timesteps are clamped to [min, max] (20, 980)
    max_timestep: float
    generator_optimizer: OptimizerConfig
    critic_optimizer: OptimizerConfig
    lora: LoRAConfig | None
    steps: StepsConfig


@dataclass(frozen=True)
class RecipeConfig:
    preset: str
    seed: int
    encoders: str  # folder with the diffusers layout `vae/`, `text_encoder/`, `tokenizer/`
    data: DataConfig
    system: SystemConfig
    toy_data: ToyDataConfig | None  # None: the training CSV is given
    encoders_stage: EncodersStageConfig | None  # None: the encoders are given (Wan2.1's)
    vae_decoder: DecoderStageConfig | None  # None: decode with the VAE of `encoders` as it is
    teacher: TeacherConfig
    ode_pairs: ODEPairsConfig
    ode: ODEConfig
    dmd_stage1: DMDConfig
    dmd_stage2: DMDConfig

    def __post_init__(self) -> None:
        if self.dmd_stage1.lora is not None or self.dmd_stage2.lora is None:
            raise ValueError("dmd_stage1 trains all parameters (lora: null); dmd_stage2 needs a lora section")


def load_config(path: str | Path) -> RecipeConfig:
    """Read a recipe YAML strictly into `RecipeConfig`."""
    data = yaml.safe_load(Path(path).read_text())
    return from_dict(RecipeConfig, data, str(path))


def from_dict(cls: type, data: object, where: str):
    """Build dataclass `cls` from a mapping: every field required, no unknown keys, types checked."""
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a mapping for {cls.__name__}, got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    if missing := names - data.keys():
        raise ValueError(f"{where}: missing keys {sorted(missing)}")
    if unknown := data.keys() - names:
        raise ValueError(f"{where}: unknown keys {sorted(unknown)}")
    hints = typing.get_type_hints(cls)
    return cls(**{name: _convert(hints[name], data[name], f"{where}.{name}") for name in names})


def _convert(tp: object, value: object, where: str):
    """Check (and for tuples / nested dataclasses, build) one YAML value against its annotation."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _convert(inner, value, where)
    if origin is Literal:
        if value not in args:
            raise ValueError(f"{where}: {value!r} is not one of {list(args)}")
        return value
    if origin is tuple:
        if not isinstance(value, list | tuple) or len(value) != len(args):
            raise ValueError(f"{where}: expected a list of {len(args)} values, got {value!r}")
        return tuple(_convert(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value, strict=True)))
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise ValueError(f"{where}: expected {tp.__name__}, got {value!r}")
    return value
