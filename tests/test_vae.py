"""The Wan VAE wrapper (tiny preset, random weights): streaming decode, per-frame encode, uint8, video files."""

import numpy as np
import pytest
import torch

from shotstream.presets import TINY
from shotstream.vae import VideoVAE, build_vae, to_uint8
from shotstream.video_io import read_video, write_mp4, write_ts_chunk

LATENT = (TINY.latent_height, TINY.latent_width)  # (8, 8)


@pytest.fixture(scope="module")
def vae() -> VideoVAE:
    torch.manual_seed(0)
    return VideoVAE(build_vae(TINY.vae)).eval()


@pytest.fixture(scope="module")
def shot_latents() -> torch.Tensor:
    return torch.randn(1, TINY.vae.z_dim, TINY.frames_per_shot, *LATENT, generator=torch.Generator().manual_seed(1))


def test_build_vae_stores_latent_statistics(vae):
    assert list(vae.vae.config.latents_mean) == list(TINY.vae.latents_mean)
    assert list(vae.vae.config.latents_std) == list(TINY.vae.latents_std)
    assert vae.vae.config.z_dim == TINY.vae.z_dim


@pytest.fixture(scope="module")
def shot_pixels(vae, shot_latents) -> torch.Tensor:
    with torch.no_grad():
        return vae.decode(shot_latents)  # (1, 3, 33, 64, 64)


def test_decode_whole_shot(shot_pixels):
    assert shot_pixels.shape == (1, 3, TINY.pixel_frames_per_shot, TINY.height, TINY.width)
    assert shot_pixels.dtype == torch.float32
    assert shot_pixels.min() >= -1 and shot_pixels.max() <= 1


@pytest.mark.parametrize("split", [(3, 3, 3), (1, 2, 3, 3), (2, 5, 1, 1)])
def test_streaming_decode_equals_whole_decode(vae, shot_latents, shot_pixels, split):
    decoder = vae.streaming_decoder()
    with torch.no_grad():
        chunks = [decoder.decode(z) for z in shot_latents.split(split, dim=2)]
    assert [c.shape[2] for c in chunks] == [4 * n - 3 * (i == 0) for i, n in enumerate(split)]  # 1 + 4 + 4 ...
    streamed = torch.cat(chunks, dim=2)
    assert streamed.dtype == torch.float32
    assert (streamed - shot_pixels).abs().max().item() <= 1e-6


def test_streaming_decoder_works_with_grad_enabled(vae, shot_latents):
    decoder = vae.streaming_decoder()
    out = decoder.decode(shot_latents[:, :, :3])
    assert out.shape == (1, 3, 9, TINY.height, TINY.width) and not out.requires_grad
    cached = [c for c in decoder.feat_cache if c is not None]  # 1x1 shortcut convs keep no cache
    assert cached and all(isinstance(c, torch.Tensor) for c in cached)  # "Rep" markers are gone after latent 2
    assert all(c.shape[2] <= 2 and not c.requires_grad for c in cached)  # a sliding window, no graph


def test_encode_frames_is_per_frame_and_normalised(vae):
    frames = torch.rand(6, 3, TINY.height, TINY.width, generator=torch.Generator().manual_seed(2)) * 2 - 1
    with torch.no_grad():
        latents = vae.encode_frames(frames.double())  # (1, C, 6, h, w), input cast to the VAE dtype
        single = torch.cat([vae.encode_frames(f[None]) for f in frames], dim=2)
        mu = torch.cat([vae.vae.encode(f[None, :, None]).latent_dist.mean for f in frames], dim=2)
    assert latents.shape == (1, TINY.vae.z_dim, 6, *LATENT) and latents.dtype == torch.float32
    torch.testing.assert_close(latents, single, rtol=0, atol=1e-5)
    mean = torch.tensor(TINY.vae.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(TINY.vae.latents_std).view(1, -1, 1, 1, 1)
    torch.testing.assert_close(latents, (mu - mean) / std, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(vae.denormalize(latents), mu, rtol=1e-5, atol=1e-5)


def test_encode_video_matches_diffusers_clip_encode(vae):
    video = torch.rand(1, 3, 9, TINY.height, TINY.width, generator=torch.Generator().manual_seed(3)) * 2 - 1
    with torch.no_grad():
        latents = vae.encode_video(video)
        mu = vae.vae.encode(video).latent_dist.mean
    assert latents.shape == (1, TINY.vae.z_dim, 3, *LATENT)
    torch.testing.assert_close(vae.denormalize(latents), mu, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="4k\\+1"):
        vae.encode_video(video[:, :, :8])


def test_to_uint8_truncates_like_the_reference():
    values = torch.tensor([-1.5, -1.0, -0.5, 0.0, 0.003, 0.5, 0.999, 1.0, 2.0])
    pixels = values.view(1, 1, -1, 1, 1).expand(1, 3, -1, 2, 2)  # (1, 3, 9, 2, 2)
    out = to_uint8(pixels)
    assert out.shape == (9, 2, 2, 3) and out.dtype == np.uint8
    # (x * 0.5 + 0.5) * 255: 63.75 -> 63, 127.5 -> 127, 127.8825 -> 127, 191.25 -> 191, 254.8725 -> 254
    assert out[:, 0, 0, 0].tolist() == [0, 0, 63, 127, 127, 191, 254, 255, 255]
    with pytest.raises(ValueError):
        to_uint8(pixels.expand(2, -1, -1, -1, -1))


def _frames(count: int, height: int = 64, width: int = 64) -> np.ndarray:
    """A horizontal red ramp over a constant green and blue, (count, height, width, 3) uint8."""
    frames = np.empty((count, height, width, 3), dtype=np.uint8)
    frames[..., 0] = np.linspace(0, 255, width).astype(np.uint8)
    frames[..., 1] = 160
    frames[..., 2] = 40
    return frames


@pytest.mark.parametrize("writer, suffix", [(write_mp4, ".mp4"), (write_ts_chunk, ".ts")])
@pytest.mark.parametrize("count", [1, 9, 12])
def test_video_round_trip(tmp_path, writer, suffix, count):
    frames = _frames(count)
    path = tmp_path / f"clip{suffix}"
    writer(frames, path, fps=TINY.fps)
    back = read_video(path)
    assert back.shape == frames.shape and back.dtype == np.uint8
    assert np.abs(back.astype(int) - frames).mean() < 4


def test_odd_sizes_are_padded_to_even(tmp_path):
    frames = _frames(3, height=33, width=47)
    write_mp4(frames, tmp_path / "odd.mp4")
    back = read_video(tmp_path / "odd.mp4")
    assert back.shape == (3, 34, 48, 3)
    assert np.abs(back[:, :33, :47].astype(int) - frames).mean() < 4


def test_video_writers_reject_bad_frames(tmp_path):
    with pytest.raises(ValueError):
        write_mp4(np.zeros((3, 64, 64, 3), dtype=np.float32), tmp_path / "bad.mp4")
    with pytest.raises(ValueError):
        write_ts_chunk(np.zeros((0, 64, 64, 3), dtype=np.uint8), tmp_path / "empty.ts")
