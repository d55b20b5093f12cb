"""The toy world: sampler rules, caption grammar, renderer geometry, exporter round trip and the evaluator."""

from __future__ import annotations

import ast
import csv
import json
import re

import numpy as np
import pytest

from train.toy_eval import METRICS, evaluate_stories
from train.toy_export import main as export_main
from train.toy_export import read_story_video
from train.toyworld import (
    COLOURS,
    FRAMES_PER_SHOT,
    PALETTE,
    SETTINGS,
    SHOT_SIZES,
    Character,
    Landmark,
    Shot,
    ToyStory,
    caption_tokens,
    caption_vocabulary,
    captions,
    render_shot,
    render_story,
    sample_story,
    shot_boundaries,
    story_from_dict,
)

SHAPE = "(circle|square|triangle)"
COLOUR = f"({'|'.join(PALETTE)})"
SETTING = f"({'|'.join(SETTINGS)})"
ONE = "(stays still|moves left|moves right|bounces|grows|shrinks)"
BOTH = "(stay still|move left|move right|bounce|grow|shrink)"
GLOBAL_RE = rf"A {COLOUR} {SHAPE}( and a {COLOUR} {SHAPE})? in the {SETTING}\."
SUBJECT = rf"({SHAPE} {ONE}(, on the (left|right))?|{SHAPE} and the {SHAPE} {BOTH})"
SHOT_RE = rf"(Close-up|Medium shot|Wide shot) of the {SUBJECT}(, now in the {SETTING})?\."


@pytest.fixture(scope="module")
def stories() -> list[ToyStory]:
    return [sample_story(seed, 2 + seed % 7) for seed in range(200)]


def test_sampler_is_deterministic():
    assert sample_story(7, 5) == sample_story(7, 5) == sample_story(np.random.default_rng(7), 5)
    assert sample_story(7, 5) != sample_story(8, 5)
    assert np.array_equal(render_story(sample_story(7, 3)), render_story(sample_story(7, 3)))


def test_caption_grammar(stories):
    for story in stories:
        caps = captions(story)
        assert list(caps) == ["global_caption"] + [f"shot{k + 1}" for k in range(len(story.shots))]
        assert re.fullmatch(GLOBAL_RE, caps["global_caption"]), caps["global_caption"]
        for k in range(len(story.shots)):
            shot = caps[f"shot{k + 1}"]
            assert re.fullmatch(SHOT_RE, shot), shot
            assert not set(caption_tokens(shot)) & set(COLOURS), shot  # shots never name a colour


def test_story_rules(stories):
    for story in stories:
        chars = story.characters
        assert 1 <= len(chars) <= 2 and len({c.shape for c in chars}) == len(chars)
        assert all(c.body in PALETTE and c.core in COLOURS and c.core != c.body for c in chars)
        changes = [s for s in story.shots if s.new_setting is not None]
        assert len(changes) <= 1 and len(story.landmarks) == 1 + len(changes)
        assert story.shots[0].new_setting is None
        assert all(m.colour in PALETTE and m.colour not in {c.body for c in chars} for m in story.landmarks)
        assert all(0.1 <= m.x <= 0.9 for m in story.landmarks)
        for prev, shot in zip(story.shots, story.shots[1:], strict=False):
            differs = (prev.size, prev.characters) != (shot.size, shot.characters)
            assert differs or shot.new_setting is not None


def test_vocabulary_covers_every_caption(stories):
    assert caption_tokens("meadow.shot0:Close-up") == ["meadow", ".", "shot0", ":", "close", "-", "up"]
    vocabulary = set(caption_vocabulary())
    for story in stories:
        caps = captions(story)
        for k in range(len(story.shots)):
            prompt = caps["global_caption"] + f"shot{k}:" + caps[f"shot{k + 1}"]
            assert set(caption_tokens(prompt)) <= vocabulary, prompt


def test_renderer_geometry():
    square, landmark = Character("square", "red", "white"), Landmark("blue", 0.9)
    shots = tuple(Shot(size, (0,), "still", "centre") for size in SHOT_SIZES)
    story = ToyStory("meadow", (square,), (landmark,), shots)
    sky, ground = SETTINGS["meadow"]
    for k, height in enumerate(SHOT_SIZES.values()):
        frames = render_shot(story, k)
        assert frames.shape == (FRAMES_PER_SHOT, 64, 64, 3) and frames.dtype == np.uint8
        frame = frames[FRAMES_PER_SHOT // 2]
        assert tuple(frame[0, 0]) == sky and tuple(frame[39, 0]) == sky  # horizon at 0.625 * 64 = row 40
        assert tuple(frame[40, 0]) == ground and tuple(frame[63, 63]) == ground
        rows = np.flatnonzero(np.any(np.all(frame == PALETTE["red"], axis=-1), axis=1))
        assert abs(len(rows) - height * 64) <= 1 and rows[-1] == 39  # stands on the horizon
        assert tuple(frame[40 - round(height * 32), 32]) == COLOURS["white"]  # the core at the centre
        assert tuple(frame[35, round(0.9 * 64)]) == PALETTE["blue"]  # the landmark
    assert render_story(story).shape == (3 * FRAMES_PER_SHOT, 64, 64, 3)


def test_evaluator_scores_ground_truth():
    stories = [sample_story(1000 + seed, 5) for seed in range(30)]
    result = evaluate_stories([render_story(s) for s in stories], stories)
    for metric in METRICS:
        assert result["overall"][metric] >= 0.98, (metric, result["overall"])
        assert all(np.isnan(v) or v >= 0.98 for v in result["by_shot"][metric].values()), metric


def test_export_round_trip(tmp_path):
    args = ["--out", str(tmp_path), "--stories", "3", "--seed", "1", "--min-shots", "2", "--max-shots", "5"]
    export_main(args)
    with open(tmp_path / "data.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["shot_num_from_caption", "json_path", "video_path", "frame_number"]
    videos, stories = [], []
    for row in rows:
        record = json.loads((tmp_path / row["json_path"]).read_text())
        story = story_from_dict(record["toy_story"])
        assert record["video_path"] == row["video_path"]
        assert {k: v for k, v in record.items() if k not in ("video_path", "toy_story")} == captions(story)
        assert ast.literal_eval(row["frame_number"]) == shot_boundaries(len(story.shots))
        assert int(row["shot_num_from_caption"]) == len(story.shots)
        video = read_story_video(tmp_path / row["video_path"])
        assert video.shape == render_story(story).shape
        assert np.abs(video.astype(np.int16) - render_story(story)).mean() < 1.0
        videos.append(video)
        stories.append(story)
    result = evaluate_stories(videos, stories)
    assert all(result["overall"][m] >= 0.98 for m in METRICS if not np.isnan(result["overall"][m]))


def test_evaluator_scores_wrong_videos_low():
    stories = [sample_story(2000 + seed, 5) for seed in range(6)]
    videos = [render_story(s) for s in stories]
    other = evaluate_stories(videos[1:] + videos[:1], stories)["overall"]
    assert other["body_colour"] < 0.3 and other["setting"] < 0.5 and other["motion"] < 0.5
    order = (4, 2, 0, 3, 1)
    shots = [np.split(v, len(order)) for v in videos]
    shuffled = [np.concatenate([v[k] for k in order]) for v in shots]
    shuffled = evaluate_stories(shuffled, stories)["overall"]
    assert shuffled["shot_size"] < 0.6 and shuffled["motion"] < 0.6
    black = evaluate_stories([np.zeros_like(v[:40]) for v in videos], stories)["overall"]  # short, too
    assert black["setting"] < 0.5  # black is nearest to the night
    assert all(black[m] == 0 for m in METRICS if m != "setting" and not np.isnan(black[m]))


def test_results_script_writes_every_variant_and_the_targets(tmp_path):
    """`train.evaluate` end to end on 1 story x 2 shots: random weights stand in for every stage."""
    import torch
    from safetensors.torch import save_file

    from shotstream.pipeline import ShotStreamPipeline
    from train.evaluate import VARIANTS, main

    pipe = ShotStreamPipeline.from_random("tiny", caption_vocabulary())
    pipe.save_pretrained(tmp_path / "model")
    for name in ("teacher/teacher.safetensors", "ode/student.safetensors", "dmd_stage1/generator.safetensors"):
        (tmp_path / "run" / name).parent.mkdir(parents=True)
        save_file(pipe.transformer.state_dict(), str(tmp_path / "run" / name))
    out = tmp_path / "results"
    args = ["--model", str(tmp_path / "model"), "--run", str(tmp_path / "run"), "--stories", "1", "--shots", "2"]
    with torch.no_grad():
        main([*args, "--out", str(out), "--variants", "ground_truth", "ode", "stage1", "stage1+2"])
        main([*args, "--out", str(out), "--variants", "first_frame_context"])  # adds a row to the same files
    results = json.loads(out.with_suffix(".json").read_text())
    assert list(results) == ["ground_truth", "ode", "stage1", "stage1+2", "first_frame_context"]
    truth = results["ground_truth"]["overall"]
    assert all(v == 1.0 or np.isnan(v) for v in truth.values())  # NaN: no later shot to check memory on
    assert all(truth[m] == 1.0 for m in ("transition", "setting", "body_colour", "shape", "shot_size"))
    same_weights = {json.dumps(results[name]["by_shot"]) for name in ("ode", "stage1", "stage1+2")}
    assert len(same_weights) == 1  # the same weights on the same seeded stories score the same
    table = out.with_suffix(".md").read_text()
    assert "| first_frame_context |" in table and "shot_size ≥ 0.9" in table and "stage1+2 ≥ stage1" in table
    assert set(VARIANTS) >= set(results)


def test_target_checks_compare_stage2_with_stage1_at_shots_4_and_5():
    from train.evaluate import target_checks

    def row(inter_shot: dict[str, float]) -> dict:
        by_shot = {"inter_shot": inter_shot, "core_consistency": {}, "landmark_consistency": {}}
        return {"overall": dict.fromkeys(METRICS, 0.0), "by_shot": by_shot}

    for final, verdict in (
        (0.2, "0.200 vs 0.100 — met"),
        (0.0, "0.000 vs 0.100 — NOT met"),
        (0.0996, "0.100 vs 0.100 — NOT met"),
    ):
        results = {"stage1+2": row({"4": final, "5": final}), "stage1": row({"4": 0.1, "5": 0.1, "2": 0.9})}
        assert target_checks(results)[-1].endswith(verdict)
