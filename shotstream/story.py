"""A story: the CPU state that carries a multi-shot video from one shot to the next.

A `Story` holds the captions and, for each generated shot, the VAE latents of the few decoded frames that
later shots can sample as context (`context_sampling.reusable_frames`: at most 7 per shot). That is all
ShotStream needs to continue a story: KV caches are rebuilt per shot anyway. It is small (tiny preset:
~30 KB per shot; Wan 1.3B: ~3 MB per shot), picklable, and never holds device tensors, so it can live in
a Gradio `gr.State` and cross ZeroGPU's process boundary.

Stories import and export the reference JSON format: `{"global_caption": str, "shot1": str, ..., "shotN": str}`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import torch

from .context_sampling import shot_ranges

MAX_JSON_BYTES = 1_000_000  # a story file larger than this is refused outright
MAX_CAPTION_CHARS = 20_000  # longer captions are refused by the JSON reader (the app truncates instead)


class StoryError(ValueError):
    """A story or prompt that cannot be used, with a message meant for the person who wrote it."""


@dataclass(frozen=True)
class ShotMemory:
    """What later shots need from one generated shot."""

    prompt: str
    num_pixel_frames: int
    frame_latents: dict[int, torch.Tensor]  # global pixel-frame index -> latent (C, h, w), CPU float32


@dataclass
class Story:
    """Captions and history of a multi-shot story generated so far (see module docstring)."""

    global_caption: str
    seed: int = 0
    shots: list[ShotMemory] = field(default_factory=list)

    @property
    def num_shots(self) -> int:
        return len(self.shots)

    @property
    def prompts(self) -> list[str]:
        return [shot.prompt for shot in self.shots]

    def shot_ranges(self) -> list[tuple[int, int]]:
        """Inclusive global pixel-frame range of every generated shot."""
        return shot_ranges([shot.num_pixel_frames for shot in self.shots])

    def undo(self) -> str:
        """Remove the last shot; returns its prompt."""
        if not self.shots:
            raise StoryError("there is no shot to undo")
        return self.shots.pop().prompt

    def to_json(self) -> dict[str, str]:
        """The reference JSON story format of the shots generated so far."""
        return {"global_caption": self.global_caption} | {f"shot{i + 1}": p for i, p in enumerate(self.prompts)}


def parse_story_json(data: str | bytes | dict, max_shots: int) -> tuple[str, list[str]]:
    """Read a reference-format story: returns (global caption, shot prompts).

    Keys `shot1..shotN` must be consecutive; other keys (e.g. `video_path`) are ignored, as in the
    reference. Raises `StoryError` with a readable message for anything else.
    """
    if isinstance(data, (str, bytes)):
        if len(data) > MAX_JSON_BYTES:
            raise StoryError(f"story file is too large ({len(data)} bytes; at most {MAX_JSON_BYTES})")
        try:
            data = json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise StoryError(f"story is not valid JSON: {error}") from error
    if not isinstance(data, dict):
        raise StoryError('a story must be a JSON object like {"global_caption": "...", "shot1": "..."}')
    caption = _text_field(data, "global_caption")
    prompts = []
    while f"shot{len(prompts) + 1}" in data:
        prompts.append(_text_field(data, f"shot{len(prompts) + 1}"))
    stray = sorted(k for k in data if k.startswith("shot") and k[4:].isdigit() and int(k[4:]) > len(prompts))
    if stray:
        raise StoryError(f"shot keys must be consecutive from shot1; found {stray[0]} after shot{len(prompts)}")
    if not prompts:
        raise StoryError('a story needs at least "shot1"')
    if len(prompts) > max_shots:
        raise StoryError(f"the story has {len(prompts)} shots; this model generates at most {max_shots}")
    return caption, prompts


def _text_field(data: dict, key: str) -> str:
    value = data.get(key)
    if not isinstance(value, str) or not value.strip():
        raise StoryError(f'"{key}" must be a non-empty string')
    if len(value) > MAX_CAPTION_CHARS:
        raise StoryError(f'"{key}" is {len(value)} characters long; at most {MAX_CAPTION_CHARS} are accepted')
    return value
