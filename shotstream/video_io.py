"""Video files: whole MP4s, MPEG-TS segments for Gradio's streaming `gr.Video`, and reading back.

Frames are always HWC RGB uint8: a video is a numpy array (T, H, W, 3). Writing goes through the ffmpeg of
`imageio-ffmpeg` with H.264 (libx264) in yuv420p, which plays in every browser. yuv420p needs even sizes, so an
odd height or width is padded by one edge-replicated row or column (read back, the video is that much larger).
"""

from __future__ import annotations

import os

import imageio_ffmpeg
import numpy as np

MP4_PARAMS = ["-crf", "18", "-preset", "medium", "-movflags", "+faststart"]  # visually lossless, web-ready
# One GOP per segment, no B-frames, no encoder delay: each segment is small and can be played on its own.
TS_PARAMS = ["-f", "mpegts", "-crf", "18", "-preset", "ultrafast", "-tune", "zerolatency"]


def _check(frames: np.ndarray) -> np.ndarray:
    """Validate (T, H, W, 3) uint8 and pad H and W up to even sizes (edge replication)."""
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or len(frames) == 0:
        raise ValueError(f"expected uint8 frames (T, H, W, 3) with T >= 1, got {frames.dtype} {frames.shape}")
    _, height, width, _ = frames.shape
    return np.pad(frames, ((0, 0), (0, height % 2), (0, width % 2), (0, 0)), mode="edge")


def _write(frames: np.ndarray, path: str | os.PathLike, fps: float, output_params: list[str]) -> None:
    frames = _check(frames)
    _, height, width, _ = frames.shape
    writer = imageio_ffmpeg.write_frames(
        os.fspath(path),
        (width, height),
        fps=fps,
        codec="libx264",
        pix_fmt_out="yuv420p",
        quality=None,  # the rate control (-crf) is in output_params
        macro_block_size=2,  # sizes are even already: never rescale
        output_params=output_params,
    )
    writer.send(None)  # start ffmpeg
    for frame in frames:
        writer.send(np.ascontiguousarray(frame))
    writer.close()


def write_mp4(frames: np.ndarray, path: str | os.PathLike, fps: float = 16) -> None:
    """Write uint8 frames (T, H, W, 3) RGB as an H.264 yuv420p MP4 (CRF 18)."""
    _write(frames, path, fps, MP4_PARAMS)


def write_ts_chunk(frames: np.ndarray, path: str | os.PathLike, fps: float = 16) -> None:
    """Write uint8 frames (T, H, W, 3) RGB as one MPEG-TS H.264 segment for `gr.Video(streaming=True)`.

    Every segment starts with a key frame (GOP = T) and has its own timestamps from 0; Gradio re-times the
    segments when it muxes them into its HLS playlist. The path should end in `.ts`.
    """
    _write(frames, path, fps, [*TS_PARAMS, "-g", str(len(frames))])


def read_video(path: str | os.PathLike) -> np.ndarray:
    """Decode every frame of a video file (MP4, TS, ...) -> uint8 (T, H, W, 3) RGB."""
    reader = imageio_ffmpeg.read_frames(os.fspath(path), output_params=["-fps_mode", "passthrough"])
    meta = reader.__next__()
    width, height = meta["size"]
    frames = [np.frombuffer(frame, dtype=np.uint8).reshape(height, width, 3) for frame in reader]
    if not frames:
        raise ValueError(f"no frames in {path}")
    return np.stack(frames)
