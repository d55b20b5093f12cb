"""The public pipeline API: streaming, determinism, cancellation, undo, story state and JSON."""

from __future__ import annotations

import dataclasses
import json
import pickle

import numpy as np
import pytest
import torch

from shotstream.context_sampling import reusable_frames
from shotstream.pipeline import ShotStreamPipeline
from shotstream.presets import get_preset, preset_to_dict
from shotstream.sampling import teacher_sample
from shotstream.scheduler import EulerSampler
from shotstream.story import StoryError, parse_story_json
from shotstream.vae import to_uint8

WORDS = [
    "a",
    "red",
    "circle",
    "and",
    "blue",
    "square",
    "in",
    "the",
    "meadow",
    "desert",
    ".",
    "shot0",
    "shot1",
    "shot2",
    "shot3",
    ":",
    "close",
    "-",
    "up",
    "of",
    "bounces",
    "wide",
]
CAPTION = "A red circle and a blue square in the meadow."
PROMPTS = ["Close-up of the circle bounces.", "Wide shot of the square moves left.", "Close-up of the square."]


@pytest.fixture(scope="module")
def pipe():
    torch.manual_seed(0)
    pipe = ShotStreamPipeline.from_random("tiny", WORDS, seed=0)
    with torch.no_grad():  # random init gives near-constant video; make outputs depend on the input
        for p in pipe.transformer.parameters():
            p.mul_(3.0)
    return pipe


def run_shot(pipe, story, prompt, seed):
    return [c for c in pipe.stream_shot(story, prompt, generator=torch.Generator().manual_seed(seed))]


def test_stream_yields_chunks_and_commits(pipe):
    story = pipe.new_story(CAPTION, seed=0)
    chunks = run_shot(pipe, story, PROMPTS[0], seed=1)
    preset = pipe.preset
    assert [c.chunk_index for c in chunks] == list(range(preset.chunks_per_shot))
    assert [len(c.frames) for c in chunks] == [9, 12, 12]  # first latent decodes to 1 frame, later ones to 4
    assert all(c.frames.dtype == np.uint8 and c.frames.shape[1:] == (64, 64, 3) for c in chunks)
    assert chunks[-1].story is story and all(c.story is None for c in chunks[:-1])
    assert story.prompts == [PROMPTS[0]] and story.shot_ranges() == [(0, 32)]
    assert sorted(story.shots[0].frame_latents) == [0, 6, 13, 16, 19, 26, 32]  # reusable frames of shot 0


def test_same_seed_same_video_other_seed_other_video(pipe):
    a = np.concatenate([c.frames for c in run_shot(pipe, pipe.new_story(CAPTION), PROMPTS[0], seed=5)])
    b = np.concatenate([c.frames for c in run_shot(pipe, pipe.new_story(CAPTION), PROMPTS[0], seed=5)])
    c = np.concatenate([c.frames for c in run_shot(pipe, pipe.new_story(CAPTION), PROMPTS[0], seed=6)])
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_cancelled_stream_leaves_story_unchanged(pipe):
    story = pipe.new_story(CAPTION)
    run_shot(pipe, story, PROMPTS[0], seed=1)
    before = pickle.dumps(story)
    stream = pipe.stream_shot(story, PROMPTS[1])
    next(stream)
    stream.close()  # what Gradio does when a visitor presses stop
    assert pickle.dumps(story) == before
    assert torch.is_grad_enabled()  # the generator's no_grad does not leak into the caller


def test_undo_then_regenerate_reproduces_the_shot(pipe):
    story = pipe.new_story(CAPTION)
    run_shot(pipe, story, PROMPTS[0], seed=1)
    first = np.concatenate([c.frames for c in run_shot(pipe, story, PROMPTS[1], seed=2)])
    assert story.undo() == PROMPTS[1] and story.num_shots == 1
    again = np.concatenate([c.frames for c in run_shot(pipe, story, PROMPTS[1], seed=2)])
    assert np.array_equal(first, again)
    with pytest.raises(StoryError):
        pipe.new_story(CAPTION).undo()


def test_history_changes_the_next_shot(pipe):
    """The context cache is used: the same prompt and noise after a different first shot differ."""
    outs = []
    for first_prompt in PROMPTS[:2]:
        story = pipe.new_story(CAPTION)
        run_shot(pipe, story, first_prompt, seed=1)
        outs.append(np.concatenate([c.frames for c in run_shot(pipe, story, PROMPTS[2], seed=3)]))
    assert not np.array_equal(*outs)


def test_story_memory_is_the_encoding_of_decoded_frames(pipe):
    story = pipe.new_story(CAPTION)
    chunks = run_shot(pipe, story, PROMPTS[0], seed=4)
    video = np.concatenate([c.frames for c in chunks])
    memory = story.shots[0].frame_latents
    # re-encode frame 16 from its uint8 pixels: close to the stored latent (which used the float pixels)
    pixels = torch.from_numpy(video[16]).permute(2, 0, 1).float() / 127.5 - 1
    with torch.no_grad():
        latent = pipe.vae.encode_frames(pixels[None])[0, :, 0]
    assert (latent - memory[16]).abs().max() < 0.05 * memory[16].abs().max()


def test_generate_story_equals_streaming_with_one_generator(pipe):
    story, video = pipe.generate_story(CAPTION, PROMPTS[:2], seed=7)
    generator = torch.Generator().manual_seed(7)
    streamed = pipe.new_story(CAPTION, seed=7)
    frames = [c.frames for p in PROMPTS[:2] for c in pipe.stream_shot(streamed, p, generator=generator)]
    assert np.array_equal(video, np.concatenate(frames))
    assert len(video) == 2 * pipe.preset.pixel_frames_per_shot
    assert story.to_json() == {"global_caption": CAPTION, "shot1": PROMPTS[0], "shot2": PROMPTS[1]}


def test_streaming_decode_equals_whole_shot_decode(pipe):
    captured = []
    sampler_rollout = pipe.sampler.rollout

    def spy(*args, **kwargs):
        for x0 in sampler_rollout(*args, **kwargs):
            captured.append(x0)
            yield x0

    pipe.sampler.rollout = spy
    try:
        frames = np.concatenate([c.frames for c in run_shot(pipe, pipe.new_story(CAPTION), PROMPTS[0], seed=8)])
    finally:
        del pipe.sampler.rollout
    with torch.no_grad():
        whole = to_uint8(pipe.vae.decode(torch.cat(captured, dim=2)))
    assert np.array_equal(frames, whole)


def test_bad_prompts_and_limits(pipe):
    story = pipe.new_story(CAPTION)
    with pytest.raises(StoryError, match="empty"):
        next(pipe.stream_shot(story, "   \n\t "))
    with pytest.raises(StoryError, match="empty"):
        pipe.new_story("  ")
    full = pipe.new_story(CAPTION)
    run_shot(pipe, full, PROMPTS[0], seed=0)
    full.shots *= pipe.preset.max_shots
    with pytest.raises(StoryError, match="already has"):
        next(pipe.stream_shot(full, PROMPTS[1]))


def test_story_json_round_trip_and_errors(pipe):
    story = pipe.new_story(CAPTION)
    run_shot(pipe, story, PROMPTS[0], seed=0)
    caption, prompts = parse_story_json(json.dumps(story.to_json()), max_shots=8)
    assert (caption, prompts) == (CAPTION, [PROMPTS[0]])
    assert pickle.loads(pickle.dumps(story)).to_json() == story.to_json()
    for bad, message in [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "JSON object"),
        ('{"shot1": "x"}', "global_caption"),
        ('{"global_caption": "g"}', "shot1"),
        ('{"global_caption": "g", "shot1": "a", "shot3": "c"}', "consecutive"),
        ('{"global_caption": "g", "shot1": 5}', "non-empty string"),
        (json.dumps({"global_caption": "g"} | {f"shot{i}": "x" for i in range(1, 10)}), "at most 8"),
        ("x" * 2_000_000, "too large"),
    ]:
        with pytest.raises(StoryError, match=message):
            parse_story_json(bad, max_shots=8)
    caption, prompts = parse_story_json({"global_caption": "g", "shot1": "a", "video_path": "v.mp4"}, 8)
    assert prompts == ["a"]


def test_save_and_load_round_trip(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "model")
    loaded = ShotStreamPipeline.from_pretrained(tmp_path / "model")
    _, a = pipe.generate_story(CAPTION, PROMPTS[:1], seed=2)
    _, b = loaded.generate_story(CAPTION, PROMPTS[:1], seed=2)
    assert np.array_equal(a, b)
    with pytest.raises(FileNotFoundError, match="not a ShotStream model folder"):
        ShotStreamPipeline.from_pretrained(tmp_path)


def test_model_folder_keeps_its_own_preset(pipe, tmp_path):
    """A model folder runs as it was saved, not as the presets table says today; old and bad files are clear."""
    changed = dataclasses.replace(pipe.preset, timestep_shift=3.0, denoising_steps=(1000, 500))
    saved = ShotStreamPipeline(changed, pipe.transformer, pipe.vae, pipe.text_encoder)
    saved.save_pretrained(tmp_path / "model")
    loaded = ShotStreamPipeline.from_pretrained(tmp_path / "model")
    assert loaded.preset == changed and loaded.preset != get_preset("tiny")
    _, a = saved.generate_story(CAPTION, PROMPTS[:1], seed=2)
    _, b = loaded.generate_story(CAPTION, PROMPTS[:1], seed=2)
    assert np.array_equal(a, b)

    marker = tmp_path / "model" / "shotstream.json"
    marker.write_text('{"preset": "tiny", "format": 1}')  # the first format: a name from the presets table
    assert ShotStreamPipeline.from_pretrained(tmp_path / "model").preset == get_preset("tiny")
    bundle = {"format": 2, "preset": preset_to_dict(changed) | {"frames_per_clip": 9}}
    for text, message in [
        ("{not json", "corrupt"),
        ('{"preset": "tiny", "format": 7}', "format 1 or 2"),
        ('{"preset": "huge", "format": 1}', "unknown preset"),
        (json.dumps(bundle), "unknown field.*frames_per_clip"),
    ]:
        marker.write_text(text)
        with pytest.raises(ValueError, match=message):
            ShotStreamPipeline.from_pretrained(tmp_path / "model")


def test_published_checkpoint_path_with_a_diffusers_base_folder(pipe, tmp_path):
    """preset= + weights= (a `.pt` holding {"generator": {"model." + name: tensor}}) + base_model= folder."""
    pipe.save_pretrained(tmp_path / "base")  # stands in for the Wan diffusers repo: vae/, text_encoder/, tokenizer/
    state = {f"model.{k}": v for k, v in pipe.transformer.state_dict().items()}
    torch.save({"generator": state}, tmp_path / "shotstream_merged.pt")
    loaded = ShotStreamPipeline.from_pretrained(
        preset="tiny", weights=tmp_path / "shotstream_merged.pt", base_model=tmp_path / "base", local_files_only=True
    )
    _, a = pipe.generate_story(CAPTION, PROMPTS[:1], seed=2)
    _, b = loaded.generate_story(CAPTION, PROMPTS[:1], seed=2)
    assert np.array_equal(a, b)
    with pytest.raises(FileNotFoundError, match="vae"):
        ShotStreamPipeline.from_pretrained(
            preset="tiny",
            weights=tmp_path / "shotstream_merged.pt",
            base_model=tmp_path / "nothing",
            local_files_only=True,
        )


def test_teacher_shot_is_the_teacher_sampler_on_the_story_context(pipe):
    """`teacher_shot` == `teacher_sample` + decode on the same conditioning, and commits like `stream_shot`."""
    story = pipe.new_story(CAPTION)
    run_shot(pipe, story, PROMPTS[0], seed=1)
    video = pipe.teacher_shot(story, PROMPTS[1], pipe.transformer, torch.Generator().manual_seed(5), steps=3)
    assert video.shape == (pipe.preset.pixel_frames_per_shot, 64, 64, 3) and story.num_shots == 2
    ranges = story.shot_ranges()
    assert sorted(story.shots[1].frame_latents) == reusable_frames(ranges, 1, pipe.preset.context_frames)

    story.undo()
    preset = pipe.preset
    cond = pipe._conditioning(story, PROMPTS[1], pipe._plan(story))
    negative = pipe.text_encoder([preset.negative_prompt])
    shape = (1, preset.frames_per_shot, 16, preset.latent_height, preset.latent_width)  # the reference's draw layout
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(5)).permute(0, 2, 1, 3, 4)
    with torch.no_grad():
        x0, _ = teacher_sample(
            pipe.transformer, EulerSampler(3, preset.timestep_shift), cond, negative, noise, preset.teacher_guidance
        )
        assert np.array_equal(video, to_uint8(pipe.vae.decode(x0)))
