"""Stage 0 (toy world only): the tiny VAE and text encoder that the 1.3B preset takes from Wan2.1.

* Text encoder: a word-level tokenizer over the toy caption vocabulary and a freshly initialised tiny UMT5,
  kept frozen like UMT5-XXL in the reference (a fixed random feature extractor: every stage learns on top).
* VAE: the tiny `AutoencoderKLWan` trained in two fits (L1 + MSE reconstruction and a small KL term).
  1. Images: single frames, each batch from many different scenes (`ShotFrames`), where it learns colours
     and shapes much faster per CPU second than on clips.
  2. Video: `start_video_as_images` first makes the video path equal to the image path (each latent frame
     encodes one frame and decodes to four copies of it), so the temporal layers start from what the image
     fit learnt instead of from noise; then whole windows, as long as the clips it will encode (the causal
     cache drifts beyond the lengths it was trained on). The last `decoder_steps` train the decoder alone on
     the posterior means, sharpening colours without moving the latent space.
  Then its per-channel latent statistics are measured and stored as `latents_mean` / `latents_std`, so that
  `VideoVAE`'s normalised latents have zero mean and unit variance like Wan's.
The result is the diffusers folder layout `load_encoders` reads: `vae/`, `text_encoder/`, `tokenizer/`.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKLWan
from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d, WanResample
from torch.utils.data import DataLoader, Dataset

from shotstream.presets import ShotStreamPreset
from shotstream.text import TextEncoder, build_text_encoder, build_word_tokenizer
from shotstream.vae import build_vae
from shotstream.video_io import read_video

from .conditioning import step_generator
from .config import DecoderStageConfig, OptimizerConfig
from .data import EpochShuffle, read_rows, to_pixels
from .optim import adamw, clip_gradients
from .toyworld import caption_vocabulary


def build_toy_text_encoder(preset: ShotStreamPreset, seed: int) -> TextEncoder:
    """Word tokenizer over the toy vocabulary + a seeded random tiny UMT5."""
    tokenizer = build_word_tokenizer(caption_vocabulary(), preset.text_encoder.max_length)
    torch.manual_seed(seed)
    encoder = build_text_encoder(preset.text_encoder, len(tokenizer))
    return TextEncoder(tokenizer, encoder, preset.text_encoder.max_length)


class VideoWindows(Dataset):
    """Consecutive, non-overlapping `clip_frames`-frame windows `(3, T, H, W)` of every training video."""

    def __init__(self, csv_path: str | Path, preset: ShotStreamPreset, clip_frames: int) -> None:
        rows = read_rows(csv_path)
        self.paths = [row.video_path for row in rows]
        self.preset, self.clip_frames = preset, clip_frames
        lengths = [row.shots[-1][1] for row in rows]  # toy videos end with their last shot
        self.windows = [(v, s) for v, n in enumerate(lengths) for s in range(0, n - clip_frames + 1, clip_frames)]

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, index: int) -> torch.Tensor:
        video, start = self.windows[index]
        frames = read_video(self.paths[video])[start : start + self.clip_frames]
        return to_pixels(frames, self.preset.height, self.preset.width).permute(1, 0, 2, 3)  # (3, T, H, W)


class ShotFrames(Dataset):
    """Every 4th frame of every training video as a 1-frame clip `(3, 1, H, W)`, held in memory (toy sizes).

    Frames 0, 4, 8, ... are the ones each latent frame stands for once `start_video_as_images` has run.
    """

    def __init__(self, csv_path: str | Path, preset: ShotStreamPreset) -> None:
        self.frames = np.concatenate([read_video(row.video_path)[::4] for row in read_rows(csv_path)])  # (N, H0, W0, 3)
        self.preset = preset

    def __len__(self) -> int:
        return len(self.frames)

    def __getitem__(self, index: int) -> torch.Tensor:
        frame = self.frames[index : index + 1]  # uint8 (1, H0, W0, 3)
        return to_pixels(frame, self.preset.height, self.preset.width).permute(1, 0, 2, 3)  # (3, 1, H, W)


@torch.no_grad()
def start_video_as_images(vae: AutoencoderKLWan) -> None:
    """Make the video path of an image-trained VAE compute exactly its image path, frame by frame.

    Every causal conv keeps only its newest time tap (the only one an image ever sees), so frames pass
    independently; the encoder's time downsamplers keep the newest frame (latent frame k = frame 4k) and
    the decoder's time upsamplers repeat it (latent frame k -> 4 copies of its image decode).
    """
    time_convs = {m.time_conv for m in vae.modules() if isinstance(m, WanResample) and hasattr(m, "time_conv")}
    for conv in time_convs:  # weight (out, in, 3, 1, 1); out = in (downsample) or 2 * in (upsample: 2 frames)
        channels = conv.weight.shape[1]
        conv.weight.zero_()
        conv.bias.zero_()
        for frame in range(conv.weight.shape[0] // channels):
            conv.weight[frame * channels : (frame + 1) * channels, :, -1, 0, 0] = torch.eye(channels)
    for conv in vae.modules():
        if isinstance(conv, WanCausalConv3d) and conv not in time_convs:
            conv.weight[:, :, :-1] = 0.0  # the past taps


class VAETraining(L.LightningModule):
    """Reconstruction training of the tiny Wan VAE on clips `(B, 3, T, H, W)` (T = 1: images).

    From step `decoder_from` on (None: never) the decoder trains alone on the posterior means.
    """

    def __init__(
        self, vae: AutoencoderKLWan, optimizer: OptimizerConfig, kl_weight: float, decoder_from: int | None, seed: int
    ) -> None:
        super().__init__()
        self.vae, self.optimizer_config, self.kl_weight, self.seed = vae, optimizer, kl_weight, seed
        self.decoder_from = decoder_from

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        if self.decoder_from is not None and self.global_step >= self.decoder_from:
            return self.decoder_step(batch)
        posterior = self.vae.encode(batch).latent_dist
        generator = step_generator(self.seed, self.global_step, self.global_rank)
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator).to(batch)
        reconstruction = self.reconstruction_loss(z, batch)
        kl = 0.5 * (posterior.mean.pow(2) + posterior.var - 1.0 - posterior.logvar).mean()  # per latent element
        self.log_dict({"vae/reconstruction": reconstruction, "vae/kl": kl}, prog_bar=True)
        return reconstruction + self.kl_weight * kl

    def decoder_step(self, batch: torch.Tensor) -> torch.Tensor:
        """Reconstruction from the posterior mean; the encoder gets no gradient (AdamW skips it)."""
        with torch.no_grad():
            z = self.vae.encode(batch).latent_dist.mean
        reconstruction = self.reconstruction_loss(z, batch)
        self.log("vae/reconstruction", reconstruction, prog_bar=True)
        return reconstruction

    def reconstruction_loss(self, z: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
        """L1 + MSE between the decoded latents `z` and the pixels `batch` `(B, 3, T, H, W)`."""
        recon = self.vae.decode(z).sample
        return F.l1_loss(recon, batch) + F.mse_loss(recon, batch)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        opt = self.optimizer_config
        return adamw(self.vae.parameters(), opt.lr, opt.betas, opt.weight_decay)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        clip_gradients(self, optimizer, self.optimizer_config.max_grad_norm)

    def exports(self, state_dict: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
        """No safetensors of its own: `finish_encoders` writes the diffusers folder."""
        return {}


class DecoderTuning(VAETraining):
    """The decoder alone, trained further on the frozen encoder's posterior means (`decoder_step`).

    The encoder and its `quant_conv` are frozen, so the latents (and every model trained on them) stay valid;
    the first `image_steps` train on every 4th frame of the windows as images (the spatial path), the rest
    on whole windows.
    """

    def __init__(self, vae: AutoencoderKLWan, config: DecoderStageConfig, seed: int) -> None:
        super().__init__(vae, config.optimizer, kl_weight=0.0, decoder_from=0, seed=seed)
        self.image_steps = config.image_steps
        vae.requires_grad_(True)
        vae.encoder.requires_grad_(False)
        vae.quant_conv.requires_grad_(False)

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        if self.global_step < self.image_steps:  # (B, 3, T, H, W) -> (B * T/4, 3, 1, H, W) images
            batch = batch[:, :, ::4].transpose(1, 2).flatten(0, 1).unsqueeze(2)
        return self.decoder_step(batch)


def window_loader(dataset: Dataset, batch_size: int, seed: int, num_workers: int) -> DataLoader:
    sampler = EpochShuffle(len(dataset), seed)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers, drop_last=True)


@torch.no_grad()
def latent_statistics(vae: AutoencoderKLWan, dataset: VideoWindows, max_windows: int) -> tuple[list, list]:
    """Per-channel mean and std of the posterior means over (at most `max_windows`) training windows."""
    vae.eval()
    means = [vae.encode(dataset[i][None]).latent_dist.mean for i in range(min(max_windows, len(dataset)))]
    latents = torch.cat([m.transpose(0, 1).flatten(1) for m in means], dim=1)  # (C, N)
    return latents.mean(dim=1).tolist(), latents.std(dim=1).clamp_min(1e-4).tolist()


def finish_encoders(vae: AutoencoderKLWan, text: TextEncoder, dataset: VideoWindows, folder: Path) -> None:
    """Store the measured latent statistics in the VAE config and write `vae/`, `text_encoder/`, `tokenizer/`."""
    mean, std = latent_statistics(vae, dataset, max_windows=256)
    vae.register_to_config(latents_mean=mean, latents_std=std)
    vae.save_pretrained(folder / "vae")
    text.save_pretrained(folder)


def new_toy_vae(preset: ShotStreamPreset, seed: int) -> AutoencoderKLWan:
    torch.manual_seed(seed)
    return build_vae(preset.vae)
