"""ShotStream: interactive, streaming, multi-shot video generation (arXiv 2603.25746) on diffusers."""

from .pipeline import ShotChunk, ShotStreamPipeline
from .presets import PRESETS, ShotStreamPreset, get_preset
from .story import Story, StoryError, parse_story_json

__all__ = [
    "PRESETS",
    "ShotChunk",
    "ShotStreamPipeline",
    "ShotStreamPreset",
    "Story",
    "StoryError",
    "get_preset",
    "parse_story_json",
]
