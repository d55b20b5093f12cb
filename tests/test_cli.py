"""`python -m shotstream generate` writes a playable mp4 and reports latency and speed."""

from __future__ import annotations

import json

import pytest

from shotstream.__main__ import main
from shotstream.video_io import read_video


def test_generate_writes_a_16_fps_mp4(tmp_path, capsys):
    story = tmp_path / "story.json"
    story.write_text(json.dumps({"global_caption": "A red circle in the meadow.", "shot1": "Close-up of the circle."}))
    out = tmp_path / "story.mp4"
    main(["generate", "--story", str(story), "--out", str(out), "--seed", "1"])
    video = read_video(out)
    assert video.shape == (33, 64, 64, 3)
    printed = capsys.readouterr().out
    assert "first frame after" in printed and "frames/s end to end" in printed


def test_bad_story_file_is_a_clear_error(tmp_path):
    story = tmp_path / "story.json"
    story.write_text('{"global_caption": "x"}')
    with pytest.raises(SystemExit, match='cannot use story .*story.json: a story needs at least "shot1"'):
        main(["generate", "--story", str(story), "--out", str(tmp_path / "o.mp4")])
    with pytest.raises(SystemExit, match="needs --weights"):
        main(["generate", "--story", str(story), "--out", str(tmp_path / "o.mp4"), "--preset", "wan2.1-1.3b"])
