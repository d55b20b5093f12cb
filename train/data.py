"""Training data in the reference format (§7) and the reference's next-shot sampling (§5.1).

A CSV row names a story JSON (`global_caption`, `shot1`..`shotN`), an mp4 and the shots' frame ranges
`frame_number = "[[start, end), ...]"`. One training clip per row:

1. per-frame shot labels are built from the range *lengths* only, then padded with a copy of themselves
   (`labels + labels[:-1]`), exactly like the reference (so gaps shift labels, quirk 20);
2. frames `0 .. min(len(video), last_end) - 1` are read, resized to the preset resolution (no crop) and
   truncated to 4k + 1 frames; pixels are `2 x / 255 - 1`;
3. the **target** is the last shot present in those frames; every earlier shot contributes context frames by
   the §4.3 counts, `round(linspace(first, last, count))` over native frame indices, flag = shot number;
4. the target keeps every `len // pixel_frames_per_shot`-th frame when it is that long, then its first
   `pixel_frames_per_shot`, truncated to 4k + 1 frames.

Captions are `global + "shot{i}:" + shot` for every shot listed in the row. VAE and text encoding, and the
context / text dropout, happen in the LightningModules (`conditioning.py`). Batches hold one clip (the
multi-caption routing shares the captions across the batch, as the reference's batch size 1 per GPU).
"""

from __future__ import annotations

import ast
import csv
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch.utils.data import DataLoader, Dataset, Sampler, Subset

from shotstream.context_sampling import plan_context
from shotstream.presets import ShotStreamPreset
from shotstream.text import story_captions
from shotstream.video_io import read_video


@dataclass
class StoryRow:
    """One CSV row, paths resolved."""

    json_path: Path
    video_path: Path
    shots: list[tuple[int, int]]  # [start, end) pixel frames per shot

    def captions(self) -> list[str]:
        """`global + "shot{i}:" + shot{i+1}` for every shot listed in the row (reference multi-caption)."""
        story = json.loads(self.json_path.read_text())
        return story_captions(story["global_caption"], [story[f"shot{i + 1}"] for i in range(len(self.shots))])


@dataclass
class ClipSample:
    """One next-shot training clip (pixels in [-1, 1], float32)."""

    context_pixels: torch.Tensor | None  # (Nc, 3, H, W) history frames, one latent each after encoding
    context_flags: torch.Tensor  # (Nc,) int32 shot number of each context frame
    target_pixels: torch.Tensor | None  # (3, T, H, W) the last shot, T = 4k + 1
    captions: list[str]  # one per shot of the row
    index: int  # row of the CSV
    context_latents: torch.Tensor | None = None  # (1, C, Nc, h, w) instead of pixels, from a latent cache
    target_latents: torch.Tensor | None = None  # (1, C, F, h, w) instead of pixels, from a latent cache

    @property
    def shot_flag(self) -> int:
        """Flag of the target frames: last context flag + 1."""
        return int(self.context_flags[-1]) + 1


@dataclass
class StorySample:
    """A story for inter-shot training (§5.5): only its captions are used, the video is generated."""

    captions: list[str]
    index: int


def read_rows(csv_path: str | Path) -> list[StoryRow]:
    """Rows of a reference training CSV; relative paths resolve against the CSV's folder, else the cwd."""
    root = Path(csv_path).parent
    with open(csv_path, newline="") as f:
        return [
            StoryRow(
                _resolve(row["json_path"], root),
                _resolve(row["video_path"], root),
                [(int(s), int(e)) for s, e in ast.literal_eval(row["frame_number"])],
            )
            for row in csv.DictReader(f)
        ]


def _resolve(path: str, root: Path) -> Path:
    candidate = root / path
    return candidate if candidate.exists() else Path(path)


def shot_labels(shots: list[tuple[int, int]]) -> list[int]:
    """Per-frame shot labels from the range lengths, plus the reference's padding copy (§7, quirk 20)."""
    labels = [shot for shot, (start, end) in enumerate(shots) for _ in range(end - start)]
    return labels + labels[:-1]


def truncate_4k1(length: int) -> int:
    """Largest 4k + 1 not above `length` (the VAE's causal clip lengths)."""
    return (length - 1) // 4 * 4 + 1


def sample_clip_frames(labels: list[int], max_target: int, budget: int) -> tuple[list[int], list[int], list[int]]:
    """The reference's next-shot sampling (§5.1) over the labels of the read frames.

    Returns (context frame indices, context flags, target frame indices), all native frame indices.
    """
    present = sorted(set(labels))
    if len(present) < 2:
        raise ValueError("a training clip needs at least two shots (context + target)")
    # 1. earlier shots: first..last native index of each, sampled with the §4.3 counts
    ranges = [(labels.index(s), len(labels) - 1 - labels[::-1].index(s)) for s in present[:-1]]
    plan = plan_context(ranges, budget)
    # 2. target: the last shot, strided when longer than a shot, then 4k + 1 frames
    target = [i for i, s in enumerate(labels) if s == present[-1]]
    if len(target) >= max_target:
        target = target[:: len(target) // max_target][:max_target]
    target = target[: truncate_4k1(len(target))]
    return [index for _, index in plan.frames], list(plan.flags), target


def to_pixels(frames: np.ndarray, height: int, width: int) -> torch.Tensor:
    """uint8 (T, H0, W0, 3) -> float32 (T, 3, H, W) in [-1, 1], resized without crop when needed."""
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255.0
    if x.shape[-2:] != (height, width):
        x = F.interpolate(x, size=(height, width), mode="bilinear", antialias=True, align_corners=False)
    return (x * 2 - 1).clamp(-1, 1)


class ClipDataset(Dataset):
    """Next-shot clips (`ClipSample`) from a reference training CSV."""

    def __init__(self, csv_path: str | Path, preset: ShotStreamPreset) -> None:
        self.rows = read_rows(csv_path)
        self.preset = preset

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> ClipSample:
        row, preset = self.rows[index], self.preset
        video = read_video(row.video_path)
        num_read = truncate_4k1(min(len(video), row.shots[-1][1]))
        labels = shot_labels(row.shots)[:num_read]
        context, flags, target = sample_clip_frames(labels, preset.pixel_frames_per_shot, preset.context_frames)
        pixels = to_pixels(video[:num_read], preset.height, preset.width)  # (T, 3, H, W)
        return ClipSample(
            context_pixels=pixels[context],
            context_flags=torch.tensor(flags, dtype=torch.int32),
            target_pixels=pixels[target].permute(1, 0, 2, 3),
            captions=row.captions(),
            index=index,
        )


class EncodedClipDataset(Dataset):
    """`ClipSample`s with `context_latents` / `target_latents` from a latent cache (no pixels, no mp4 read)."""

    def __init__(self, csv_path: str | Path, cache_path: str | Path) -> None:
        self.rows = read_rows(csv_path)
        self.cache_path = str(cache_path)
        with safe_open(self.cache_path, framework="pt") as f:
            cached = int(f.metadata()["rows"])
        if cached != len(self.rows):
            raise ValueError(
                f"{cache_path} encodes {cached} clips but {csv_path} has {len(self.rows)} rows: "
                "delete the cache so the `latents` stage writes it again"
            )

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> ClipSample:
        with safe_open(self.cache_path, framework="pt") as f:
            context, flags, target = (f.get_tensor(f"{index}.{key}") for key in ("context", "flags", "target"))
        return ClipSample(
            context_pixels=None,
            context_flags=flags,
            target_pixels=None,
            captions=self.rows[index].captions(),
            index=index,
            context_latents=context[None],  # (1, C, Nc, h, w)
            target_latents=target[None],  # (1, C, F, h, w)
        )


class StoryDataset(Dataset):
    """Story captions (`StorySample`) from a reference training CSV; the videos are not read."""

    def __init__(self, csv_path: str | Path) -> None:
        self.rows = read_rows(csv_path)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> StorySample:
        return StorySample(self.rows[index].captions(), index)


class EpochShuffle(Sampler[int]):
    """A permutation drawn from `seed + epoch`: reproducible across restarts (Lightning calls `set_epoch`)."""

    def __init__(self, size: int, seed: int) -> None:
        self.size, self.seed, self.epoch = size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.size, generator=generator).tolist())


def collate_one(batch: list):
    """Batches hold exactly one sample (per process), returned as is."""
    if len(batch) != 1:
        raise ValueError(f"ShotStream training uses one clip per process, got {len(batch)}")
    return batch[0]


class MultiShotDataModule(L.LightningDataModule):
    """Reference-format training data: `ClipSample`s (stages 1, 2.1a, 2.2.1) or `StorySample`s (2.2.2).

    Training order is a seeded per-epoch shuffle; `predict_dataloader` (ODE-pair sampling) keeps CSV order.
    """

    def __init__(
        self,
        csv_path: str,
        preset: ShotStreamPreset,
        stories_only: bool,
        seed: int,
        num_workers: int,
        latent_cache: Path | None = None,
        predict_rows: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        self.csv_path, self.preset, self.stories_only = csv_path, preset, stories_only
        self.seed, self.num_workers, self.latent_cache = seed, num_workers, latent_cache
        self.predict_rows = predict_rows

    def dataset(self) -> Dataset:
        """Stories, else clips: encoded ones when a latent cache (`train.latent_cache`) is given."""
        if self.stories_only:
            return StoryDataset(self.csv_path)
        if self.latent_cache is not None:
            return EncodedClipDataset(self.csv_path, self.latent_cache)
        return ClipDataset(self.csv_path, self.preset)

    def train_dataloader(self) -> DataLoader:
        dataset = self.dataset()
        sampler = EpochShuffle(len(dataset), self.seed)
        return DataLoader(dataset, batch_size=1, sampler=sampler, collate_fn=collate_one, num_workers=self.num_workers)

    def predict_dataloader(self) -> DataLoader:
        """CSV order; only the rows in `predict_rows` when it is set (a resumed ODE-pair run)."""
        dataset = self.dataset()
        if self.predict_rows is not None:
            dataset = Subset(dataset, self.predict_rows)
        return DataLoader(dataset, batch_size=1, collate_fn=collate_one, num_workers=self.num_workers)
