"""app.py: the page builds without a GPU; the handlers on good and bad input, stop and JSON round trips (driven
directly, through a ZeroGPU-like pickling boundary); and the API of the launched app through gradio_client, with two
visitors at once. Uses the embedded toy-world model (`assets/tiny/`)."""

from __future__ import annotations

import json
import pickle
import re
import threading
import time
from pathlib import Path

import gradio as gr
import pytest
import torch
from gradio_client import Client

import app
from shotstream.story import MAX_JSON_BYTES, ShotMemory, Story, parse_story_json
from shotstream.video_io import read_video

SETTING = "A red circle in the meadow."
SHOT1 = "Close-up of the circle bounces."
SHOT2 = "Wide shot of the circle moves left, on the right."


@pytest.fixture(scope="module")
def pipe():
    return app.load_pipeline("tiny")[0]


@pytest.fixture(scope="module")
def studio(pipe, tmp_path_factory):
    """Handlers whose GPU function sees and returns pickled copies, as on ZeroGPU (a forked worker)."""
    studio = app.StoryStudio(pipe, workdir=str(tmp_path_factory.mktemp("app")))
    on_gpu = studio.stream_shot

    def across_processes(*args):
        for update in on_gpu(*pickle.loads(pickle.dumps(args))):
            yield pickle.loads(pickle.dumps(update))

    studio.stream_shot = across_processes
    return studio


@pytest.fixture(scope="module")
def one_shot(studio):
    """A session with one finished shot, and what was yielded on the way."""
    outputs = list(studio.generate(SETTING, SHOT1, 0, False, app.Session()))
    return outputs[-1][3], outputs


def first(handler_output):
    """Run a generator handler up to its first yield (that is where its input checks raise)."""
    return next(iter(handler_output))


def test_demo_builds_without_gpu(pipe, tmp_path):
    demo = app.create_demo(pipe, "about", workdir=str(tmp_path))
    names = {d["api_name"] for d in demo.config["dependencies"]}
    assert {"generate", "regenerate", "play", "stop", "undo", "new_story", "export_json", "export_video"} <= names
    assert demo._queue.max_size == app.QUEUE_SIZE
    assert not torch.cuda.is_initialized()


def test_shot_streams_chunk_by_chunk_then_commits(one_shot, pipe):
    session, outputs = one_shot
    assert len(outputs) == pipe.preset.chunks_per_shot
    for k, (segment, status, _, state, *_) in enumerate(outputs):
        assert segment.endswith(f"-{k}.ts") and f"chunk {k + 1} of {len(outputs)}" in status
        assert ("Done" in status) == (k == len(outputs) - 1)
        assert isinstance(state, app.Session) == (k == len(outputs) - 1)  # committed with the last chunk only
    assert session.story.prompts == [SHOT1] and session.seeds == (0,)
    assert [p.suffix for p in Path(session.folder).iterdir()] == [".mp4"]  # the streamed segments are gone
    frames = read_video(session.clips[0])
    assert frames.shape[0] == pipe.preset.pixel_frames_per_shot and min(frames.shape[1:3]) >= app.DISPLAY_SIZE
    chat = outputs[-1][2]
    assert [m["role"] for m in chat] == ["user", "user", "assistant"]
    assert chat[2]["content"][1]["path"] == session.clips[0]


def test_bad_input_gets_a_clear_message(studio):
    empty = app.Session()
    with pytest.raises(gr.Error, match="prompt is empty"):
        first(studio.generate(SETTING, "", 0, False, empty))
    with pytest.raises(gr.Error, match="prompt is empty"):
        first(studio.generate(SETTING, "\x00\x07 \t\x1b", 0, False, empty))
    with pytest.raises(gr.Error, match="setting"):
        first(studio.generate("  ", SHOT1, 0, False, empty))
    full = Story(SETTING, shots=[ShotMemory("x", 33, {})] * studio.preset.max_shots)
    with pytest.raises(gr.Error, match="the most this model makes"):
        first(studio.generate(SETTING, SHOT1, 0, False, app.Session(full, ("c",) * 8, (0,) * 8)))
    with pytest.raises(gr.Error, match="no shot to regenerate"):
        first(studio.regenerate(empty))
    with pytest.raises(gr.Error, match="no shot to undo"):
        studio.undo(empty)
    with pytest.raises(gr.Error, match="no story to export"):
        studio.export_json(empty)
    with pytest.raises(gr.Error, match="no shot to download"):
        studio.export_video(empty)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "JSON object"),
        ('{"shot1": "x"}', "global_caption"),
        ('{"global_caption": "A red circle in the meadow."}', "shot1"),
        ('{"global_caption": "g", "shot1": "a", "shot3": "c"}', "consecutive"),
        (json.dumps({"global_caption": "g"} | {f"shot{k}": "s" for k in range(1, 10)}), "at most 8"),
        (json.dumps({"global_caption": "g", "shot1": "x" * (MAX_JSON_BYTES + 1)}), "too large"),
        ('{"global_caption": "g", "shot1": "\\u0000\\u0001"}', "prompt is empty"),
    ],
)
def test_bad_story_json_gets_a_clear_message(studio, tmp_path, text, message):
    with pytest.raises(gr.Error, match=message):
        first(studio.play(text, 0, app.Session()))
    (path := tmp_path / "story.json").write_text(text)
    with pytest.raises(gr.Error, match=message if "too large" not in message else "larger than"):
        studio.read_json_file(str(path))


def test_long_prompt_with_control_characters_and_emoji(studio, one_shot):
    session, _ = one_shot
    prompt = f"{SHOT2} \x00\x1b[31m🎈🦄 " + "very " * 4000
    assert len(prompt) > 20_000
    with pytest.warns(UserWarning) as notices:
        outputs = list(studio.generate("ignored: the story has a setting", prompt, 0, False, session))
    text = " ".join(str(w.message) for w in notices)
    assert "only the first 2,000 are used" in text and "tokens" in text and "🎈" in text
    assert "only the first 2,000" in outputs[0][1]  # visible in the status line too
    new = outputs[-1][3]
    assert new.story.num_shots == 2 and new.story.global_caption == SETTING and new.clips[0] == session.clips[0]
    stored = new.story.prompts[1]
    assert len(stored) <= app.MAX_PROMPT_CHARS and "🎈🦄" in stored and not re.search(r"[\x00-\x1f]", stored)
    assert session.story.num_shots == 1  # the session it started from is untouched


def test_stop_mid_shot_leaves_story_and_files_unchanged(studio, one_shot):
    session, _ = one_shot
    files = sorted(Path(session.folder).iterdir())
    shots = list(session.story.shots)
    running = studio.generate(SETTING, SHOT2, 0, False, session)
    segment, status, *_ = next(running)
    assert "chunk 1 of" in status and Path(segment).is_file()
    running.close()  # what Gradio does on Stop
    assert session.story.shots == shots and session.story.num_shots == 1
    assert sorted(Path(session.folder).iterdir()) == files  # no segment or half shot left behind
    running = studio.generate(SETTING, SHOT1, 0, False, app.Session())
    next(running)
    running.close()  # a stopped first shot: still no story


def test_regenerate_undo_and_new_story(studio, one_shot):
    session, _ = one_shot
    outputs = list(studio.regenerate(session))
    new = outputs[-1][3]
    assert new.story.prompts == [SHOT1] and new.seeds != session.seeds and new.clips != session.clips
    assert not Path(session.clips[0]).exists() and Path(new.clips[0]).is_file()  # the replaced clip is deleted
    _, status, chat, undone, prompt, setting = studio.undo(new)
    assert undone.story is None and chat == [] and prompt == SHOT1 and setting["interactive"] is True
    assert "Removed shot 1" in status and not Path(new.clips[0]).exists()
    player, _, chat, fresh, prompt, setting = studio.new_story(new)
    assert player is None and chat == [] and fresh.story is None and fresh.folder == new.folder


def test_story_json_plays_and_exports_back(studio):
    story = {"global_caption": SETTING, "shot1": SHOT1, "shot2": SHOT2}
    outputs = list(studio.play(json.dumps(story), 3, app.Session()))
    session = outputs[-1][3]
    assert [o[1].startswith("Shot 2") for o in outputs].count(True) == studio.preset.chunks_per_shot
    assert session.seeds == (3, 4) and len(render := app.render_chat(session)) == 5 and "Shot 2" in str(render[-1])
    text, path = studio.export_json(session)
    assert json.loads(text) == story == json.loads(Path(path).read_text())
    assert parse_story_json(text, studio.preset.max_shots) == (SETTING, [SHOT1, SHOT2])
    frames = read_video(studio.export_video(session))
    assert len(frames) == 2 * studio.preset.pixel_frames_per_shot


def test_gpu_lease_grows_with_the_shot(studio):
    seconds = studio.gpu_seconds(Story(SETTING), SHOT1, 0, "")
    assert seconds == app.GPU_BASE_SECONDS + app.GPU_SECONDS_PER_CHUNK * studio.preset.chunks_per_shot


def test_examples_are_valid_stories():
    from train.toyworld import caption_tokens, caption_vocabulary

    shape, colour = "(circle|square|triangle)", "(red|orange|yellow|blue|purple|pink)"
    setting = "(meadow|desert|ocean|night|snow|studio)"
    one = "(stays still|moves left|moves right|bounces|grows|shrinks)"
    both = "(stay still|move left|move right|bounce|grow|shrink)"
    global_caption = rf"A {colour} {shape}( and a {colour} {shape})? in the {setting}\."
    subject = rf"({shape} {one}(, on the (left|right))?|{shape} and the {shape} {both})"
    shot = rf"(Close-up|Medium shot|Wide shot) of the {subject}(, now in the {setting})?\."
    vocabulary = set(caption_vocabulary())
    paths = sorted(app.EXAMPLES_DIR.glob("*.json"))
    assert len([p for p in paths if p.name.startswith("toy-")]) >= 3 and any(p.name.startswith("film-") for p in paths)
    for path in paths:
        caption, prompts = parse_story_json(path.read_text(), 8)
        assert 3 <= len(prompts) <= 5, path
        if path.name.startswith("toy-"):
            assert re.fullmatch(global_caption, caption), path
            assert all(re.fullmatch(shot, p) for p in prompts), path
            assert {w for t in [caption, *prompts] for w in caption_tokens(t)} <= vocabulary, path


def test_real_model_without_weights_says_how_to_get_them(monkeypatch, tmp_path):
    monkeypatch.setenv("SHOTSTREAM_WEIGHTS", str(tmp_path / "missing.pt"))
    monkeypatch.setenv("SHOTSTREAM_BASE_MODEL", str(tmp_path))
    with pytest.raises(SystemExit, match="SHOTSTREAM_WEIGHTS.*--model tiny"):
        app.load_pipeline("shotstream")


# ---------------------------------------------------------------------------------------------------- the API


@pytest.fixture(scope="module")
def server(pipe, tmp_path_factory):
    demo = app.create_demo(pipe, "about", workdir=str(tmp_path_factory.mktemp("server")))
    _, url, _ = demo.launch(prevent_thread_lock=True, quiet=True)
    yield url
    demo.close()


def build_story(url: str, setting: str, prompts: list[str], results: dict) -> None:
    client = Client(url, verbose=False)
    for prompt in prompts:
        client.predict(setting, prompt, 0, False, api_name="/generate")
    results[setting] = json.loads(client.predict(api_name="/export_json")[0])


def test_api_two_visitors_at_once_keep_their_own_story(server):
    stories = {
        "A red circle in the meadow.": ["Close-up of the circle bounces.", "Wide shot of the circle grows."],
        "A blue square in the snow.": ["Medium shot of the square shrinks.", "Close-up of the square stays still."],
    }
    results = {}
    threads = [threading.Thread(target=build_story, args=(server, s, p, results)) for s, p in stories.items()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=240)
    for setting, prompts in stories.items():
        assert results[setting] == {"global_caption": setting} | {f"shot{k + 1}": p for k, p in enumerate(prompts)}


def test_api_stream_errors_and_stop(server):
    client = Client(server, verbose=False)
    with pytest.raises(Exception, match="prompt is empty"):
        client.predict(SETTING, "   ", 0, False, api_name="/generate")
    job = client.submit(SETTING, SHOT1, 0, False, api_name="/generate")
    video, status, chat, prompt, setting = job.result()
    assert (
        video.endswith(".m3u8") and "Done" in status and len(chat) == 3 and prompt == "" and setting["value"] == SETTING
    )
    chunks = [o[1].split(", ")[0] for o in job.outputs()]
    assert chunks == [f"Shot 1: chunk {k + 1} of {len(chunks)}" for k in range(len(chunks))]
    job = client.submit(SETTING, SHOT2, 0, False, api_name="/generate")
    deadline = time.time() + 120
    while not job.outputs() and time.time() < deadline:
        time.sleep(0.05)
    job.cancel()
    time.sleep(1.0)
    assert json.loads(client.predict(api_name="/export_json")[0]) == {"global_caption": SETTING, "shot1": SHOT1}
