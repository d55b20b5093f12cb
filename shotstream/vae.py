"""The Wan VAE of ShotStream: normalised latents, per-frame context encoding and chunk-streamed decoding.

Layouts follow diffusers: latents are `(B, C, F, h, w)` with C = z_dim (16), pixels `(B, 3, T, H, W)` in [-1, 1],
T = 1 + 4 (F - 1), H = 8 h, W = 8 w. As in the reference `WanVAEWrapper`:

* latents are the posterior **mean** (no sampling), normalised per channel with the config's statistics,
  `z = (mu - mean) * (1 / std)`, and de-normalised with `z / (1 / std) + mean` (the reciprocal is taken in the
  VAE dtype, like the reference in bf16);
* context frames are encoded one frame at a time, each as an independent 1-frame clip;
* decoded pixels are clamped to [-1, 1] and returned in float32;
* the final video is `uint8((x * 0.5 + 0.5).clamp(0, 1) * 255)`, truncating, at 16 fps.

`StreamingDecoder` keeps diffusers' causal feature cache between calls, so a shot decoded chunk by chunk gives
exactly the frames of a whole-shot decode: the first latent gives 1 frame, every later latent 4 frames.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKLWan

from .presets import VAEConfig


def build_vae(config: VAEConfig) -> AutoencoderKLWan:
    """A freshly initialised `AutoencoderKLWan` (latent statistics stored in its config)."""
    kwargs = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(config).items()}
    return AutoencoderKLWan(**kwargs)


def to_uint8(pixels: torch.Tensor) -> np.ndarray:
    """(1, 3, T, H, W) in [-1, 1] -> uint8 (T, H, W, 3), exactly the reference conversion (truncation)."""
    if pixels.ndim != 5 or pixels.shape[0] != 1 or pixels.shape[1] != 3:
        raise ValueError(f"expected pixels of shape (1, 3, T, H, W), got {tuple(pixels.shape)}")
    video = (pixels[0].float() * 0.5 + 0.5).clamp(0, 1) * 255  # (3, T, H, W)
    return video.permute(1, 2, 3, 0).to(torch.uint8).cpu().numpy()  # (T, H, W, 3), float -> uint8 truncates


class VideoVAE(torch.nn.Module):
    """An `AutoencoderKLWan` with ShotStream's latent normalisation.

    Device and dtype are those of the wrapped module (`.to(...)` it); inputs are moved to them. Gradients are
    left to the caller (wrap inference in `torch.no_grad()`).
    """

    def __init__(self, vae: AutoencoderKLWan) -> None:
        super().__init__()
        self.vae = vae

    @classmethod
    def from_pretrained(cls, folder_or_repo: str, local_files_only: bool = False) -> VideoVAE:
        """Load the `vae/` subfolder of a diffusers-format folder or Hub repo (local folders first)."""
        try:
            return cls(
                AutoencoderKLWan.from_pretrained(folder_or_repo, subfolder="vae", local_files_only=local_files_only)
            )
        except (OSError, ValueError) as error:
            raise FileNotFoundError(
                f"cannot load the VAE from {folder_or_repo}/vae ({error}). For the real model download it with "
                '`hf download Wan-AI/Wan2.1-T2V-1.3B-Diffusers --include "vae/*" --local-dir <folder>`'
            ) from error

    def save_pretrained(self, folder: str | Path) -> None:
        """Write `folder/vae/` (safetensors + config.json)."""
        self.vae.save_pretrained(Path(folder) / "vae")

    @property
    def device(self) -> torch.device:
        return self.vae.device

    @property
    def dtype(self) -> torch.dtype:
        return self.vae.dtype

    def latent_stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, inv_std), each (1, C, 1, 1, 1) in the VAE dtype; inv_std = 1 / std taken in that dtype."""
        mean = torch.tensor(self.vae.config.latents_mean, device=self.device).to(self.dtype)
        std = torch.tensor(self.vae.config.latents_std, device=self.device).to(self.dtype)
        return mean.view(1, -1, 1, 1, 1), (1.0 / std).view(1, -1, 1, 1, 1)

    def normalize(self, mu: torch.Tensor) -> torch.Tensor:
        """Posterior mean (B, C, F, h, w) -> normalised latents `(mu - mean) * inv_std`."""
        mean, inv_std = self.latent_stats()
        return (mu - mean) * inv_std

    def denormalize(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents (B, C, F, h, w) -> VAE latents `z / inv_std + mean`, in the VAE dtype."""
        mean, inv_std = self.latent_stats()
        return latents.to(device=self.device, dtype=self.dtype) / inv_std + mean

    def encode_video(self, video: torch.Tensor) -> torch.Tensor:
        """(B, 3, T, H, W) in [-1, 1], T = 4k + 1 -> normalised latents (B, C, k + 1, H/8, W/8) (causal clip)."""
        if video.ndim != 5 or video.shape[2] % 4 != 1:
            raise ValueError(f"expected a video (B, 3, 4k+1, H, W), got {tuple(video.shape)}")
        mu = self.vae.encode(video.to(device=self.device, dtype=self.dtype)).latent_dist.mean
        return self.normalize(mu)  # (B, C, F, h, w)

    def encode_frames(self, frames: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) in [-1, 1] -> normalised latents (1, C, N, H/8, W/8), one latent per frame.

        Every frame is encoded as its own 1-frame clip (the reference clears the causal cache per frame);
        the N clips go through the encoder as one batch, which is the same computation.
        """
        if frames.ndim != 4 or frames.shape[1] != 3:
            raise ValueError(f"expected frames (N, 3, H, W), got {tuple(frames.shape)}")
        clips = frames.to(device=self.device, dtype=self.dtype).unsqueeze(2)  # (N, 3, 1, H, W)
        mu = self.vae.encode(clips).latent_dist.mean  # (N, C, 1, h, w)
        return self.normalize(mu).permute(2, 1, 0, 3, 4)  # (1, C, N, h, w)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents (B, C, F, h, w) -> pixels (B, 3, 1 + 4 (F - 1), 8h, 8w) float32 in [-1, 1]."""
        return self.vae.decode(self.denormalize(latents)).sample.float().clamp(-1, 1)

    def streaming_decoder(self) -> StreamingDecoder:
        """A fresh chunk-by-chunk decoder for one shot (start a new one for every shot)."""
        return StreamingDecoder(self)


class StreamingDecoder:
    """Decodes one shot chunk by chunk with the exact result of `VideoVAE.decode` on the whole shot.

    State: diffusers' causal feature cache, one entry per `WanCausalConv3d` of the decoder, each the last (up to
    2) time steps of that conv's input, (B, C_l, <=2, h_l, w_l) (or the marker "Rep" that a temporal upsampler
    leaves after the first latent); and the number of latents decoded so far (the first one is decoded with
    `first_chunk=True` and gives 1 frame, later ones give 4 frames each). `decode` runs under `torch.no_grad()`,
    so the cache never keeps a graph alive between chunks.
    """

    def __init__(self, vae: VideoVAE) -> None:
        if vae.vae.config.patch_size is not None:
            raise ValueError("streaming decode supports the Wan2.1 VAE layout only (patch_size=None)")
        self.vae = vae
        self.feat_cache: list[torch.Tensor | str | None] = [None] * vae.vae._cached_conv_counts["decoder"]
        self.num_latents = 0

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents (B, C, f, h, w), the next f latents of the shot -> pixels (B, 3, t, 8h, 8w).

        t = 4f, or 4f - 3 for the shot's first chunk; float32, clamped to [-1, 1].
        """
        wan = self.vae.vae
        x = wan.post_quant_conv(self.vae.denormalize(latents))  # (B, C, f, h, w), 1x1x1 conv: no cache needed
        frames = []
        for i in range(x.shape[2]):
            out = wan.decoder(
                x[:, :, i : i + 1],
                feat_cache=self.feat_cache,
                feat_idx=[0],
                first_chunk=self.num_latents == 0,
            )  # (B, 3, 1 or 4, H, W)
            frames.append(out)
            self.num_latents += 1
        return torch.cat(frames, dim=2).float().clamp(-1, 1)  # (B, 3, t, H, W)
