"""Command line: `python -m shotstream generate --story STORY.json --out story.mp4`.

Generates every shot of a reference-format story JSON with the streaming pipeline, writes a 16 fps mp4
and prints the time to the first decoded frame and the end-to-end frames per second.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

from .pipeline import ShotStreamPipeline
from .presets import EMBEDDED_MODEL, PRESETS
from .story import StoryError, parse_story_json
from .video_io import write_mp4


def load_pipeline(args: argparse.Namespace) -> ShotStreamPipeline:
    """The model named by the arguments: a model folder, a published checkpoint, or the embedded one."""
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    options = dict(device=args.device, dtype=dtype)
    if args.weights is not None and Path(args.weights).is_dir():
        return ShotStreamPipeline.from_pretrained(args.weights, **options)
    if args.weights is not None:
        return ShotStreamPipeline.from_pretrained(
            preset=args.preset, weights=args.weights, base_model=args.base_model, **options
        )
    if args.preset == "tiny" and (EMBEDDED_MODEL / "shotstream.json").is_file():
        return ShotStreamPipeline.from_pretrained(EMBEDDED_MODEL, **options)
    if args.preset != "tiny":
        raise SystemExit(f"--preset {args.preset} needs --weights (e.g. shotstream_merged.pt) and --base-model")
    print("warning: no trained tiny model found; using RANDOM weights (output is noise)", file=sys.stderr)
    return ShotStreamPipeline.from_random("tiny", vocabulary=[], **options)


def generate(args: argparse.Namespace) -> None:
    pipe = load_pipeline(args)
    try:
        caption, prompts = parse_story_json(Path(args.story).read_text(encoding="utf-8"), pipe.preset.max_shots)
    except (OSError, StoryError) as error:
        raise SystemExit(f"cannot use story {args.story}: {error}") from error
    story = pipe.new_story(caption, seed=args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    frames, first_frame = [], None
    start = time.perf_counter()
    for k, prompt in enumerate(prompts):
        for chunk in pipe.stream_shot(story, prompt, generator=generator):
            first_frame = first_frame if first_frame is not None else time.perf_counter() - start
            frames.append(chunk.frames)
        print(f"shot {k + 1}/{len(prompts)} done: {sum(len(f) for f in frames)} frames")
    elapsed = time.perf_counter() - start
    video = np.concatenate(frames)
    write_mp4(video, args.out, fps=pipe.preset.fps)
    print(f"wrote {args.out}: {len(video)} frames at {pipe.preset.fps} fps")
    print(f"first frame after {first_frame:.3f} s; {len(video) / elapsed:.1f} frames/s end to end")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m shotstream", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    gen = commands.add_parser("generate", help="generate a whole story JSON into an mp4")
    gen.add_argument("--story", required=True, help='reference-format JSON: {"global_caption", "shot1", ...}')
    gen.add_argument("--out", required=True, help="output .mp4 path")
    gen.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    gen.add_argument("--weights", help="model folder, or a published checkpoint (.pt / .safetensors)")
    gen.add_argument("--base-model", help="diffusers-format Wan folder or Hub id (VAE + text encoder)")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--device", default="cpu")
    gen.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = parser.parse_args(argv)
    generate(args)


if __name__ == "__main__":
    main()
