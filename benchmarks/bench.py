"""Speed benchmark of streaming ShotStream generation (a script, not a test).

    python -m benchmarks.bench --preset tiny                       # 2-core CPU target: >= 32 fps, first frame <= 0.5 s
    python -m benchmarks.bench --preset wan2.1-1.3b --device cuda --dtype bfloat16 [--text-device cpu]

Random weights of the preset's exact shapes (speed does not depend on weight values). Reports, for a
5-shot story streamed with `ShotStreamPipeline.stream_shot`: time to the first decoded frame of every
shot, per-chunk denoise / decode / total time (it must stay flat across shots: the caches are bounded),
end-to-end frames per second and peak memory; then, in the same run, the bidirectional teacher
re-generating one shot (50 Euler steps with CFG, whole-shot decode) for comparison.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time

import torch

from shotstream.pipeline import ShotStreamPipeline
from shotstream.sampling import ShotConditioning, teacher_sample
from shotstream.scheduler import EulerSampler

CAPTION = "A red circle and a blue square in the meadow."
PROMPTS = [
    "Close-up of the circle bounces.",
    "Wide shot of the shapes moves left.",
    "Medium shot of the square stays still, on the right.",
    "Close-up of the square grows, now in the desert.",
    "Wide shot of the circle moves right.",
]


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cpu":
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    return torch.accelerator.max_memory_allocated(device) / 2**20


def stream_story(pipe: ShotStreamPipeline, shots: int) -> list[dict]:
    """Stream a story; one record per shot with its per-chunk timings."""
    story = pipe.new_story(CAPTION, seed=0)
    records = []
    for k in range(shots):
        start = time.perf_counter()
        chunks, first = [], None
        for chunk in pipe.stream_shot(story, PROMPTS[k % len(PROMPTS)]):
            now = time.perf_counter()
            first = first if first is not None else now - start
            chunks.append(dict(frames=len(chunk.frames), denoise=chunk.denoise_seconds, decode=chunk.decode_seconds))
        total = time.perf_counter() - start
        frames = sum(c["frames"] for c in chunks)
        records.append(
            dict(shot=k + 1, first_frame_s=first, seconds=total, frames=frames, fps=frames / total, chunks=chunks)
        )
    return records


@torch.no_grad()
def teacher_shot(pipe: ShotStreamPipeline, steps: int) -> dict:
    """Re-generate one shot with the bidirectional teacher (the student's weights stand in for it)."""
    preset, device, dtype = pipe.preset, pipe.device, pipe.dtype
    shape = (1, preset.vae.z_dim, preset.context_frames, preset.latent_height, preset.latent_width)
    embeds = pipe.text_encoder([CAPTION + "shot0:" + PROMPTS[0]] * 2).to(device, dtype)
    cond = ShotConditioning(
        torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape[2], dtype=torch.int32), 1, embeds
    )
    noise_shape = (1, preset.vae.z_dim, preset.frames_per_shot, preset.latent_height, preset.latent_width)
    noise = torch.randn(noise_shape, generator=torch.Generator().manual_seed(0)).to(device, dtype)
    start = time.perf_counter()
    x0, _ = teacher_sample(pipe.transformer, EulerSampler(steps, preset.timestep_shift), cond, embeds[:1], noise, 6.0)
    frames = pipe.vae.decode(x0).shape[2]
    seconds = time.perf_counter() - start
    return dict(steps=steps, seconds=seconds, frames=frames, fps=frames / seconds)


def report(records: list[dict], teacher: dict, device: torch.device) -> None:
    print(f"{'shot':>4} {'first frame s':>13} {'shot s':>7} {'fps':>6}  per-chunk denoise / decode / total s")
    for r in records:
        chunks = " ".join(f"{c['denoise']:.3f}/{c['decode']:.3f}/{c['denoise'] + c['decode']:.3f}" for c in r["chunks"])
        print(f"{r['shot']:>4} {r['first_frame_s']:>13.3f} {r['seconds']:>7.3f} {r['fps']:>6.1f}  {chunks}")
    steady = records[1:] or records
    frames, seconds = sum(r["frames"] for r in steady), sum(r["seconds"] for r in steady)
    per_chunk = [c["denoise"] + c["decode"] for r in steady for c in r["chunks"]]
    print(
        f"student, shots {steady[0]['shot']}-{steady[-1]['shot']}: {frames / seconds:.1f} frames/s end to end, "
        f"median first frame {statistics.median(r['first_frame_s'] for r in steady):.3f} s, "
        f"chunk time min/median/max {min(per_chunk):.3f}/{statistics.median(per_chunk):.3f}/{max(per_chunk):.3f} s"
    )
    print(
        f"teacher re-generation ({teacher['steps']} steps, CFG): {teacher['seconds']:.2f} s per shot = "
        f"{teacher['fps']:.2f} frames/s ({frames / seconds / teacher['fps']:.0f}x slower than the student)"
    )
    print(f"peak memory: {peak_memory_mb(device):.0f} MB ({device.type})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--shots", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--text-device", default=None, help="e.g. cpu: keep the text encoder off the GPU")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--teacher-steps", type=int, default=50)
    parser.add_argument("--json", help="also write the raw figures to this file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    pipe = ShotStreamPipeline.from_random(
        args.preset, vocabulary=CAPTION.lower().split(), device=args.device, dtype=dtype, text_device=args.text_device
    )
    list(pipe.stream_shot(pipe.new_story(CAPTION), PROMPTS[0]))  # warm-up
    records = stream_story(pipe, args.shots)
    teacher = teacher_shot(pipe, args.teacher_steps)
    report(records, teacher, pipe.device)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(preset=args.preset, device=args.device, shots=records, teacher=teacher), f, indent=1)


if __name__ == "__main__":
    main()
