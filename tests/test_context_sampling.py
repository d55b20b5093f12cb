"""Dynamic context sampling reproduces the reference's table (§4.3) and its reuse bound."""

from __future__ import annotations

import random

import pytest

from shotstream.context_sampling import context_counts, frame_indices, plan_context, reusable_frames, shot_ranges

# reference §4.3, 81-frame shots: (counts, sampled global pixel frames, context flags, generated flag)
REFERENCE_TABLE = {
    0: ([6], [], [0] * 6, 1),
    1: ([6], [0, 16, 32, 48, 64, 80], [0] * 6, 1),
    2: ([3, 3], [0, 40, 80, 81, 121, 161], [0, 0, 0, 1, 1, 1], 2),
    3: ([2, 2, 2], [0, 80, 81, 161, 162, 242], [0, 0, 1, 1, 2, 2], 3),
    4: ([1, 1, 2, 2], [0, 81, 162, 242, 243, 323], [0, 1, 2, 2, 3, 3], 4),
    5: ([1, 1, 1, 1, 2], [0, 81, 162, 243, 324, 404], [0, 1, 2, 3, 4, 4], 5),
    6: ([1] * 6, [0, 81, 162, 243, 324, 405], [0, 1, 2, 3, 4, 5], 6),
    7: ([0, 1, 1, 1, 1, 1, 1], [81, 162, 243, 324, 405, 486], [1, 2, 3, 4, 5, 6], 7),
}


@pytest.mark.parametrize("shot", sorted(REFERENCE_TABLE))
def test_reference_table_for_81_frame_shots(shot):
    counts, frames, flags, shot_flag = REFERENCE_TABLE[shot]
    if shot:
        assert context_counts(shot, 6) == counts
    plan = plan_context(shot_ranges([81] * 8)[:shot], budget=6)
    assert [index for _, index in plan.frames] == frames
    assert list(plan.flags) == flags
    assert plan.shot_flag == shot_flag


def test_linspace_rounds_half_to_even_in_float32():
    assert frame_indices(0, 5, 3) == [0, 2, 5]  # 2.5 -> 2 (half to even)
    assert frame_indices(0, 7, 3) == [0, 4, 7]  # 3.5 -> 4
    assert frame_indices(10, 20, 1) == [10] and frame_indices(10, 20, 0) == []


def test_reusable_frames_cover_every_later_context():
    rng = random.Random(0)
    for _ in range(20):
        lengths = [rng.randint(5, 90) for _ in range(12)]
        ranges = shot_ranges(lengths)
        keep = {shot: set(reusable_frames(ranges, shot, 6)) for shot in range(len(lengths))}
        for k in range(1, len(lengths) + 1):
            for shot, index in plan_context(ranges[:k], 6).frames:
                assert index in keep[shot]
        assert max(len(v) for v in keep.values()) <= 7


def test_first_frame_only_ablation_keeps_counts_and_takes_each_shot_start():
    ranges = shot_ranges([81] * 4)
    dynamic, ablation = plan_context(ranges, 6), plan_context(ranges, 6, first_frame_only=True)
    assert ablation.flags == dynamic.flags and ablation.shot_flag == dynamic.shot_flag
    assert [index for _, index in ablation.frames] == [0, 81, 162, 162, 243, 243]
    keep = {shot: set(reusable_frames(ranges, shot, 6)) for shot in range(4)}
    assert all(index in keep[shot] for shot, index in ablation.frames)  # a story still holds them
