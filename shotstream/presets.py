"""The presets table: every size-dependent number of ShotStream in one place.

`wan2.1-1.3b` is exactly the reference configuration (KlingAIResearch/ShotStream on Wan2.1-T2V-1.3B).
`tiny` is the toy-world model (64x64 frames, 33 frames per shot) that trains and streams on a 2-core CPU.
The CLI (`--preset`), the app and the tests all read this table.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

# Wan2.1 VAE latent statistics (reference `WanVAEWrapper`, also in the diffusers VAE config).
WAN_LATENTS_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)  # fmt: skip
WAN_LATENTS_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
                   3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)  # fmt: skip

# The Wan negative prompt used as the unconditional branch of the teacher's CFG (reference configs).
WAN_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，"
    "JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，"
    "手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)


@dataclass(frozen=True)
class TransformerConfig:
    """Keyword arguments of diffusers' `WanTransformer3DModel` (saved in the checkpoint's config.json)."""

    num_attention_heads: int
    attention_head_dim: int
    num_layers: int
    ffn_dim: int
    text_dim: int
    freq_dim: int = 256
    in_channels: int = 16
    out_channels: int = 16
    patch_size: tuple[int, int, int] = (1, 2, 2)
    eps: float = 1e-6
    rope_max_seq_len: int = 1024


@dataclass(frozen=True)
class VAEConfig:
    """Keyword arguments of diffusers' `AutoencoderKLWan`."""

    base_dim: int
    z_dim: int
    dim_mult: tuple[int, ...]
    num_res_blocks: int
    temperal_downsample: tuple[bool, ...] = (False, True, True)
    latents_mean: tuple[float, ...] = WAN_LATENTS_MEAN
    latents_std: tuple[float, ...] = WAN_LATENTS_STD


@dataclass(frozen=True)
class TextEncoderConfig:
    """The UMT5 text encoder: `max_length` tokens, `d_model` = the transformer's `text_dim`.

    The real preset loads google/umt5-xxl from the diffusers repo folder; the size fields
    are used only to build a fresh (tiny) encoder with transformers' `UMT5Config`.
    """

    max_length: int
    d_model: int
    num_layers: int
    num_heads: int
    d_kv: int
    d_ff: int
    vocab_size: int


@dataclass(frozen=True)
class ShotStreamPreset:
    """Everything that depends on the model size. Latent frames unless named `pixel`."""

    name: str
    height: int  # pixels
    width: int  # pixels
    frames_per_shot: int  # latent frames generated per shot (reference: 21)
    frames_per_chunk: int  # latent frames per autoregressive chunk (reference: 3)
    context_frames: int  # global context cache size in latent frames (reference: 6)
    fps: int
    transformer: TransformerConfig
    vae: VAEConfig
    text_encoder: TextEncoderConfig
    timestep_shift: float = 8.0
    denoising_steps: tuple[int, ...] = (1000, 740, 500, 260)  # nominal, warped onto the shift table
    teacher_steps: int = 50
    teacher_guidance: float = 6.0  # CFG scale of the teacher sampler (ODE pairs)
    real_score_guidance: float = 3.0  # DMD: pred_real = c + g (c - u)
    max_shots: int = 16  # stories longer than this are refused (memory stays bounded anyway)
    negative_prompt: str = WAN_NEGATIVE_PROMPT
    # Hugging Face repositories of the published weights (None: not published).
    base_model_repo: str | None = None
    shotstream_repo: str | None = None
    shotstream_checkpoint: str | None = None
    notes: str = field(default="", compare=False)

    @property
    def vae_stride(self) -> tuple[int, int, int]:
        return (4, 8, 8)

    @property
    def latent_height(self) -> int:
        return self.height // self.vae_stride[1]

    @property
    def latent_width(self) -> int:
        return self.width // self.vae_stride[2]

    @property
    def tokens_per_frame(self) -> int:
        _, ph, pw = self.transformer.patch_size
        return (self.latent_height // ph) * (self.latent_width // pw)

    @property
    def chunks_per_shot(self) -> int:
        return self.frames_per_shot // self.frames_per_chunk

    @property
    def pixel_frames_per_shot(self) -> int:
        return 1 + self.vae_stride[0] * (self.frames_per_shot - 1)

    def __post_init__(self) -> None:
        if self.frames_per_shot % self.frames_per_chunk:
            raise ValueError(f"{self.name}: frames_per_shot must be a multiple of frames_per_chunk")
        if self.height % 16 or self.width % 16:
            raise ValueError(f"{self.name}: height and width must be multiples of 16 (VAE 8 x patch 2)")
        head_dim = self.transformer.attention_head_dim
        if head_dim % 2 or head_dim < 6:
            raise ValueError(f"{self.name}: attention_head_dim must be even and >= 6 for 3-axis RoPE")
        if self.text_encoder.d_model != self.transformer.text_dim:
            raise ValueError(f"{self.name}: text encoder d_model must equal transformer text_dim")


WAN21_1_3B = ShotStreamPreset(
    name="wan2.1-1.3b",
    height=480,
    width=832,
    frames_per_shot=21,
    frames_per_chunk=3,
    context_frames=6,
    fps=16,
    transformer=TransformerConfig(
        num_attention_heads=12, attention_head_dim=128, num_layers=30, ffn_dim=8960, text_dim=4096
    ),
    vae=VAEConfig(base_dim=96, z_dim=16, dim_mult=(1, 2, 4, 4), num_res_blocks=2),
    text_encoder=TextEncoderConfig(
        max_length=512, d_model=4096, num_layers=24, num_heads=64, d_kv=64, d_ff=10240, vocab_size=256384
    ),
    base_model_repo="Wan-AI/Wan2.1-T2V-1.3B-Diffusers",
    shotstream_repo="KlingTeam/ShotStream",
    shotstream_checkpoint="shotstream_merged.pt",
    notes="ShotStream as published: Wan2.1-T2V-1.3B causal student, 480x832, 81 frames per shot.",
)

TINY = ShotStreamPreset(
    name="tiny",
    height=64,
    width=64,
    frames_per_shot=9,
    frames_per_chunk=3,
    context_frames=6,
    fps=16,
    transformer=TransformerConfig(num_attention_heads=2, attention_head_dim=64, num_layers=4, ffn_dim=512, text_dim=64),
    vae=VAEConfig(base_dim=8, z_dim=16, dim_mult=(1, 2, 2, 2), num_res_blocks=1),
    text_encoder=TextEncoderConfig(
        max_length=48, d_model=64, num_layers=2, num_heads=2, d_kv=32, d_ff=128, vocab_size=256
    ),
    max_shots=8,
    teacher_guidance=3.0,  # measured on the toy teacher: setting/shot size best at 3, worse at 1 and 6 (README)
    real_score_guidance=2.0,  # the same CFG 3 in DMD's c + g (c - u) form
    notes="Toy-world ShotStream: 64x64, 33 frames per shot, trained on CPU by train/.",
)

PRESETS: dict[str, ShotStreamPreset] = {p.name: p for p in (TINY, WAN21_1_3B)}
EMBEDDED_MODEL = Path(__file__).resolve().parent.parent / "assets" / "tiny"  # the shipped `tiny` model folder


def preset_to_dict(preset: ShotStreamPreset) -> dict:
    """Every field of `preset` as JSON-ready values (what a model folder's `shotstream.json` stores)."""
    return asdict(preset)


def preset_from_dict(values: dict) -> ShotStreamPreset:
    """Inverse of `preset_to_dict`; raises ValueError naming a missing or unknown field."""
    return _from_dict(ShotStreamPreset, values, "preset")


_NESTED = {"transformer": TransformerConfig, "vae": VAEConfig, "text_encoder": TextEncoderConfig}


def _from_dict(cls: type, values: dict, where: str):
    if not isinstance(values, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(values).__name__}")
    names = {f.name for f in fields(cls)}
    if unknown := sorted(set(values) - names):
        raise ValueError(f"{where}: unknown field(s) {unknown}")
    kwargs = {}
    for name, value in values.items():
        if name in _NESTED:  # only ShotStreamPreset has these fields
            value = _from_dict(_NESTED[name], value, f"{where}.{name}")
        kwargs[name] = tuple(value) if isinstance(value, list) else value  # JSON arrays are the tuple fields
    try:
        return cls(**kwargs)
    except TypeError as error:  # a required field is missing
        raise ValueError(f"{where}: {error}") from None


def get_preset(name: str) -> ShotStreamPreset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}") from None
