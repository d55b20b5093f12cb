"""Stage 0 (toy world only): the tiny VAE and text encoder that the 1.3B preset takes from Wan2.1.

* Text encoder: a word-level tokenizer over the toy caption vocabulary and a freshly initialised tiny UMT5,
  kept frozen like UMT5-XXL in the reference (a fixed random feature extractor: every stage learns on top).
* VAE: the tiny `AutoencoderKLWan` trained on windows of the training videos (L1 + MSE reconstruction and a
  small KL term; the first `image_steps` on single frames, where it learns colours and shapes much faster
  per CPU second, then on whole windows for the temporal path; windows as long as the clips it will encode,
  since the causal cache drifts beyond the lengths it was trained on; the last `decoder_steps` train the
  decoder alone on the posterior means, sharpening colours without moving the latent space, so latents
  encoded before them stay valid). Then its per-channel latent statistics
  are measured and stored as `latents_mean` / `latents_std`, so that `VideoVAE`'s normalised latents have
  zero mean and unit variance like Wan's.
The result is the diffusers folder layout `load_encoders` reads: `vae/`, `text_encoder/`, `tokenizer/`.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKLWan
from torch.utils.data import DataLoader, Dataset

from shotstream.presets import ShotStreamPreset
from shotstream.text import TextEncoder, build_text_encoder, build_word_tokenizer
from shotstream.vae import build_vae
from shotstream.video_io import read_video

from .conditioning import step_generator
from .config import DecoderStageConfig, EncodersStageConfig
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


class VAETraining(L.LightningModule):
    """Reconstruction training of the tiny Wan VAE on video windows `(B, 3, T, H, W)`."""

    def __init__(self, vae: AutoencoderKLWan, config: EncodersStageConfig | DecoderStageConfig, seed: int) -> None:
        super().__init__()
        self.vae, self.config, self.seed = vae, config, seed

    @property
    def decoder_only(self) -> bool:
        return self.global_step >= self.config.steps.max_steps - self.config.decoder_steps

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        if self.global_step < self.config.image_steps:  # (B, 3, T, H, W) -> (B * T/4, 3, 1, H, W) images
            batch = batch[:, :, ::4].transpose(1, 2).flatten(0, 1).unsqueeze(2)
        if self.decoder_only:
            return self.decoder_step(batch)
        posterior = self.vae.encode(batch).latent_dist
        generator = step_generator(self.seed, self.global_step, self.global_rank)
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator).to(batch)
        reconstruction = self.reconstruction_loss(z, batch)
        kl = 0.5 * (posterior.mean.pow(2) + posterior.var - 1.0 - posterior.logvar).mean()  # per latent element
        loss = reconstruction + self.config.kl_weight * kl
        self.log_dict({"vae/reconstruction": reconstruction, "vae/kl": kl}, prog_bar=True)
        return loss

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
        opt = self.config.optimizer
        return adamw(self.vae.parameters(), opt.lr, opt.betas, opt.weight_decay)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        clip_gradients(self, optimizer, self.config.optimizer.max_grad_norm)

    def exports(self, state_dict: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
        """No safetensors of its own: `finish_encoders` writes the diffusers folder."""
        return {}


class DecoderTuning(VAETraining):
    """The decoder alone, trained further on the frozen encoder's posterior means (`decoder_step`).

    The encoder and its `quant_conv` are frozen, so the latents (and every model trained on them) stay valid;
    the first `image_steps` train on single frames (the spatial path), the rest on whole windows.
    """

    def __init__(self, vae: AutoencoderKLWan, config: DecoderStageConfig, seed: int) -> None:
        super().__init__(vae, config, seed)
        vae.requires_grad_(True)
        vae.encoder.requires_grad_(False)
        vae.quant_conv.requires_grad_(False)

    @property
    def decoder_only(self) -> bool:
        return True


def window_loader(dataset: VideoWindows, batch_size: int, seed: int, num_workers: int) -> DataLoader:
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
