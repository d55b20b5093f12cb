"""Dynamic context sampling (reference §4.3): which history frames fill the global context cache.

For shot k (0-based) with a budget of `Nc` context frames (6):
  * k = 0: no history; `Nc` zero frames with flag 0, and the generated frames get flag 1;
  * k >= 1: every earlier shot j gets `Nc // k` frames and the *last* `Nc % k` shots one more; inside shot j
    the frames are `round(linspace(start_j, end_j, count_j))` over global pixel-frame indices (float32
    linspace, round half to even); their flags are j, and the generated frames get flag k.

The ablation `first_frame_only=True` keeps the counts but takes every frame of shot j at `start_j` (what a
first-frame-only context would give, with the cache layout unchanged).

The same rule serves inference (decoded history) and training (ground-truth history, native frame
indices). Because each context frame is VAE-encoded on its own, the latent of a history frame never
changes: `reusable_frames` lists the few frames of a shot that any later shot can pick, so a story only
keeps (and encodes once) those.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ContextPlan:
    """The context of one shot: `frames[i]` = (source shot, global pixel-frame index), and the flags."""

    frames: tuple[tuple[int, int], ...]  # empty for the first shot (zero context)
    flags: tuple[int, ...]  # (Nc,) shot flag of each context frame
    shot_flag: int  # flag of the frames being generated


def context_counts(num_previous_shots: int, budget: int) -> list[int]:
    """Frames taken from each previous shot: `budget // n` each, the remainder to the most recent."""
    base, remainder = divmod(budget, num_previous_shots)
    counts = [base] * num_previous_shots
    for i in range(1, remainder + 1):
        counts[-i] += 1
    return counts


def frame_indices(start: int, end: int, count: int) -> list[int]:
    """`round(linspace(start, end, count))` in float32 (inclusive `end`); count 1 -> [start]."""
    if count == 0:
        return []
    return torch.round(torch.linspace(start, end, steps=count)).long().tolist()


def shot_ranges(shot_lengths: list[int]) -> list[tuple[int, int]]:
    """Inclusive global `(start, end)` pixel-frame ranges of consecutive shots."""
    ranges, start = [], 0
    for length in shot_lengths:
        ranges.append((start, start + length - 1))
        start += length
    return ranges


def plan_context(ranges: list[tuple[int, int]], budget: int, first_frame_only: bool = False) -> ContextPlan:
    """The context plan for the shot after `ranges` (the inclusive ranges of all previous shots)."""
    if not ranges:
        return ContextPlan(frames=(), flags=(0,) * budget, shot_flag=1)
    frames = []
    for shot, ((start, end), count) in enumerate(zip(ranges, context_counts(len(ranges), budget), strict=True)):
        frames += [(shot, index) for index in frame_indices(start, start if first_frame_only else end, count)]
    if len(frames) != budget:
        raise AssertionError(f"context sampling produced {len(frames)} frames, expected {budget}")
    flags = tuple(shot for shot, _ in frames)
    return ContextPlan(frames=tuple(frames), flags=flags, shot_flag=flags[-1] + 1)


def reusable_frames(ranges: list[tuple[int, int]], shot: int, budget: int) -> list[int]:
    """Global indices of the frames of `shot` that any later shot can sample.

    A later shot k samples `count_k(shot)` frames of `shot`; once `k > shot + budget` the count is 0 (only
    the last `budget` shots contribute), so the union over `k = shot+1 .. shot+budget` is complete.
    """
    start, end = ranges[shot]
    picked: set[int] = set()
    for k in range(shot + 1, shot + budget + 1):
        picked.update(frame_indices(start, end, context_counts(k, budget)[shot]))
    return sorted(picked)
