"""`ShotStreamPipeline`: the public API that the app, the CLI, the benchmarks and training call.

    pipe = ShotStreamPipeline.from_pretrained("assets/tiny")           # or preset="wan2.1-1.3b", weights=...
    story = pipe.new_story("A red circle in the meadow.", seed=0)
    for chunk in pipe.stream_shot(story, "Close-up of the circle bounces."):
        show(chunk.frames)                                             # uint8 (T, H, W, 3), as soon as decoded
    # the shot is now committed to `story`; a stream closed early leaves `story` unchanged

Per shot (reference §3.4-§4.4, streamed): sample the context frames from the story, encode the captions
of shots 0..k, insert the context into a fresh dual KV cache, then for each chunk run the 4-step loop,
the clean re-run, and decode the chunk right away with the VAE's streaming decoder, so the first frames
appear after one chunk rather than one shot. After the last chunk, the latents of the frames that later
shots may sample are encoded (one frame at a time, as the reference) and the shot is committed.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .checkpoint import load_transformer_weights
from .context_sampling import ContextPlan, plan_context, reusable_frames, shot_ranges
from .presets import ShotStreamPreset, get_preset, preset_from_dict, preset_to_dict
from .sampling import GeneratorNoise, NoiseSource, ShotConditioning, StudentSampler, teacher_sample
from .scheduler import EulerSampler, FlowMatchTable
from .story import ShotMemory, Story, StoryError
from .text import TextEncoder, build_text_encoder, build_word_tokenizer, clean_text, story_captions
from .transformer import ShotStreamTransformer
from .vae import VideoVAE, build_vae, to_uint8

BUNDLE_FILE = "shotstream.json"  # marks a folder written by `save_pretrained`; holds the model's whole preset
BUNDLE_FORMAT = 2  # 1: the preset's name only (read from the presets table); 2: every preset field


def _read_bundle_preset(marker: Path) -> ShotStreamPreset:
    """The preset a model folder was saved with (format 2), so that a later edit of the presets table
    (a new timestep shift, other denoising steps) cannot silently change how old weights are run.
    Format 1 files name a preset of the table. Raises ValueError saying what is wrong with the file."""
    try:
        bundle = json.loads(marker.read_text(encoding="utf-8"))
        if not isinstance(bundle, dict) or bundle.get("format") not in (1, BUNDLE_FORMAT):
            raise ValueError(f"expected a JSON object with format 1 or {BUNDLE_FORMAT}")
        if bundle["format"] == 1:
            return get_preset(bundle["preset"])
        return preset_from_dict(bundle["preset"])
    except (ValueError, KeyError, UnicodeDecodeError) as error:  # JSONDecodeError is a ValueError
        raise ValueError(f"{marker} is corrupt or from a newer version: {error}") from None


@dataclass
class ShotChunk:
    """One streamed chunk of a shot. Picklable, CPU only."""

    frames: np.ndarray  # uint8 (T, H, W, 3) decoded frames of this chunk
    shot_index: int  # 0-based index of the shot being generated
    chunk_index: int  # 0-based
    num_chunks: int
    denoise_seconds: float
    decode_seconds: float
    story: Story | None = None  # the story with the shot committed; set on the last chunk only

    @property
    def is_last(self) -> bool:
        return self.chunk_index + 1 == self.num_chunks


class ShotStreamPipeline:
    """Streaming multi-shot generation with a causal ShotStream student (see module docstring).

    `first_frame_context=True` is an evaluation ablation: every context frame is the first frame of its shot
    (`plan_context(first_frame_only=True)`) instead of the reference's spread over the shot.
    """

    def __init__(
        self,
        preset: ShotStreamPreset,
        transformer: ShotStreamTransformer,
        vae: VideoVAE,
        text_encoder: TextEncoder,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        text_device: torch.device | str | None = None,
        first_frame_context: bool = False,
    ) -> None:
        self.preset, self.first_frame_context = preset, first_frame_context
        self.device, self.dtype = torch.device(device), dtype
        self.text_device = torch.device(text_device) if text_device is not None else self.device
        # plain nn.Module.to: the whole model in `dtype`, as the reference casts it (diffusers would warn)
        self.transformer = torch.nn.Module.to(transformer, self.device, dtype).eval().requires_grad_(False)
        self.vae = torch.nn.Module.to(vae, self.device, dtype).eval().requires_grad_(False)
        self.text_encoder = text_encoder.to(self.text_device, dtype).eval().requires_grad_(False)
        self.table = FlowMatchTable(preset.timestep_shift)
        timesteps = self.table.warp(preset.denoising_steps)
        self.sampler = StudentSampler(self.transformer, self.table, timesteps, preset.frames_per_chunk)

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_random(
        cls, preset: str | ShotStreamPreset, vocabulary: list[str], seed: int = 0, **kwargs
    ) -> ShotStreamPipeline:
        """Randomly initialised weights (benchmarks, tests); the tokenizer is built from `vocabulary`."""
        preset = get_preset(preset) if isinstance(preset, str) else preset
        torch.manual_seed(seed)
        transformer = ShotStreamTransformer.from_preset(preset.transformer)
        tokenizer = build_word_tokenizer(vocabulary, preset.text_encoder.max_length)
        encoder = build_text_encoder(preset.text_encoder, len(tokenizer))
        text = TextEncoder(tokenizer, encoder, preset.text_encoder.max_length)
        return cls(preset, transformer, VideoVAE(build_vae(preset.vae)), text, **kwargs)

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path | None = None,
        *,
        preset: str | None = None,
        weights: str | Path | None = None,
        base_model: str | Path | None = None,
        local_files_only: bool = False,
        **kwargs,
    ) -> ShotStreamPipeline:
        """Load a pipeline.

        * `path`: a folder written by `save_pretrained` (our format: safetensors + config JSON per part);
        * or `preset` + `weights` (a published ShotStream `.pt` or any converted state dict) + `base_model`
          (a local diffusers-format Wan folder or its Hub id, for the VAE and the UMT5 text encoder).
        `kwargs` go to the constructor (`device`, `dtype`, `text_device`, `first_frame_context`).
        """
        if path is not None:
            return cls._from_bundle(Path(path), **kwargs)
        if preset is None or weights is None:
            raise ValueError("give either a model folder, or preset= and weights= (and base_model=)")
        preset_ = get_preset(preset)
        base = base_model or preset_.base_model_repo
        if base is None:
            raise ValueError(f"preset {preset!r} has no published base model: pass base_model=")
        transformer = ShotStreamTransformer.from_preset(preset_.transformer)
        load_transformer_weights(transformer, weights)
        vae = VideoVAE.from_pretrained(str(base), local_files_only=local_files_only)
        text = TextEncoder.from_pretrained(
            str(base), max_length=preset_.text_encoder.max_length, local_files_only=local_files_only
        )
        return cls(preset_, transformer, vae, text, **kwargs)

    @classmethod
    def _from_bundle(cls, folder: Path, **kwargs) -> ShotStreamPipeline:
        marker = folder / BUNDLE_FILE
        if not marker.is_file():
            raise FileNotFoundError(
                f"{folder} is not a ShotStream model folder (no {BUNDLE_FILE}); build one with "
                "`python -m train.recipe` or pass preset= and weights= for the published model"
            )
        preset = _read_bundle_preset(marker)
        transformer = ShotStreamTransformer.from_preset(preset.transformer)
        load_transformer_weights(transformer, folder / "transformer" / "diffusion_pytorch_model.safetensors")
        vae = VideoVAE.from_pretrained(str(folder), local_files_only=True)
        text = TextEncoder.from_pretrained(
            str(folder), max_length=preset.text_encoder.max_length, local_files_only=True
        )
        return cls(preset, transformer, vae, text, **kwargs)

    def save_pretrained(self, folder: str | Path) -> None:
        """Write the pipeline as safetensors + config JSON per part (diffusers folder layout)."""
        folder = Path(folder)
        self.transformer.save_pretrained(folder / "transformer")
        self.vae.save_pretrained(folder)
        self.text_encoder.save_pretrained(folder)
        bundle = {"format": BUNDLE_FORMAT, "preset": preset_to_dict(self.preset)}
        (folder / BUNDLE_FILE).write_text(json.dumps(bundle, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")

    # ------------------------------------------------------------------ generation

    def new_story(self, global_caption: str, seed: int = 0) -> Story:
        if not clean_text(global_caption):
            raise StoryError("the story setting (global caption) is empty")
        return Story(global_caption=global_caption, seed=seed)

    def stream_shot(
        self,
        story: Story,
        prompt: str,
        generator: torch.Generator | None = None,
        noise: NoiseSource | None = None,
    ) -> Iterator[ShotChunk]:
        """Generate the next shot of `story`, yielding decoded chunks as they are made.

        The shot is committed to `story` just before the last chunk is yielded; closing the generator
        earlier leaves `story` unchanged. Noise comes from `noise` if given, else from `generator` (CPU),
        else from a generator seeded with `story.seed + shot index`.
        """
        self._check_prompt(story, prompt)
        k = story.num_shots
        plan = self._plan(story)
        if noise is None:
            generator = generator or torch.Generator().manual_seed(story.seed + k)
            noise = GeneratorNoise(generator, self.device, self.dtype)
        yield from self._stream(story, prompt, plan, noise)

    @torch.no_grad()
    def teacher_shot(
        self, story: Story, prompt: str, teacher: ShotStreamTransformer, generator: torch.Generator, steps: int = 50
    ) -> np.ndarray:
        """Generate the next shot with a bidirectional next-shot teacher and commit it; returns uint8 (T, H, W, 3).

        The teacher (stage 1 of training, same class and size as the student) denoises the whole shot at once
        with `steps` Euler steps and classifier-free guidance against the preset's negative prompt, on the same
        context frames the student would get. Far slower than `stream_shot`; for evaluation and comparison.
        """
        self._check_prompt(story, prompt)
        preset, teacher = self.preset, torch.nn.Module.to(teacher, self.device, self.dtype)
        cond = self._conditioning(story, prompt, self._plan(story))
        negative = self.text_encoder([preset.negative_prompt]).to(self.device, self.dtype)  # (1, L, D)
        shape = (1, preset.vae.z_dim, preset.frames_per_shot, preset.latent_height, preset.latent_width)
        noise = GeneratorNoise(generator, self.device, self.dtype).initial(shape)
        sampler = EulerSampler(steps, preset.timestep_shift)
        x0, _ = teacher_sample(teacher, sampler, cond, negative, noise, preset.teacher_guidance)
        pixels = self.vae.decode(x0)  # (1, 3, T, H, W)
        start, keep = self._next_shot_frames(story)
        story.shots.append(self._memory(prompt, {i: pixels[0, :, i - start] for i in keep}))
        return to_uint8(pixels)

    def generate_story(self, global_caption: str, prompts: list[str], seed: int = 0) -> tuple[Story, np.ndarray]:
        """Batch generation of a whole story; returns it and its video uint8 `(T, H, W, 3)`.

        One CPU generator seeded once draws the noise of every shot, in the reference's order.
        """
        story = self.new_story(global_caption, seed)
        generator = torch.Generator().manual_seed(seed)
        frames = [c.frames for p in prompts for c in self.stream_shot(story, p, generator=generator)]
        return story, np.concatenate(frames)

    def caption_token_counts(self, story: Story, prompt: str) -> list[int]:
        """Tokens of each caption the next shot would use (beyond `max_length` they are truncated)."""
        return self.text_encoder.count_tokens(story_captions(story.global_caption, [*story.prompts, prompt]))

    def _check_prompt(self, story: Story, prompt: str) -> None:
        if not clean_text(prompt):
            raise StoryError("the shot prompt is empty")
        if story.num_shots >= self.preset.max_shots:
            raise StoryError(f"the story already has {story.num_shots} shots, the most this model makes")

    def _next_shot_frames(self, story: Story) -> tuple[int, set[int]]:
        """Global index of the next shot's first frame, and its frames that later shots may sample."""
        ranges = shot_ranges([shot.num_pixel_frames for shot in story.shots] + [self.preset.pixel_frames_per_shot])
        return ranges[-1][0], set(reusable_frames(ranges, story.num_shots, self.preset.context_frames))

    def _plan(self, story: Story) -> ContextPlan:
        return plan_context(story.shot_ranges(), self.preset.context_frames, self.first_frame_context)

    def _conditioning(self, story: Story, prompt: str, plan: ContextPlan) -> ShotConditioning:
        captions = story_captions(story.global_caption, [*story.prompts, prompt])
        embeds = self.text_encoder(captions).to(self.device, self.dtype)  # (k+1, text_len, text_dim)
        preset, c = self.preset, self.preset.vae.z_dim
        if plan.frames:
            memory = story.shots
            latents = torch.stack([memory[shot].frame_latents[index] for shot, index in plan.frames], dim=1)
            latents = latents[None].to(self.device, self.dtype)  # (1, C, Nc, h, w)
        else:
            shape = (1, c, preset.context_frames, preset.latent_height, preset.latent_width)
            latents = torch.zeros(shape, device=self.device, dtype=self.dtype)
        return ShotConditioning(latents, torch.tensor(plan.flags, dtype=torch.int32), plan.shot_flag, embeds)

    @torch.no_grad()  # torch re-enters the mode around each next(), so it does not leak to the consumer
    def _stream(self, story: Story, prompt: str, plan: ContextPlan, noise: NoiseSource) -> Iterator[ShotChunk]:
        preset = self.preset
        cond = self._conditioning(story, prompt, plan)
        start, keep = self._next_shot_frames(story)
        cache = self.transformer.new_cache(1, preset.context_frames, preset.frames_per_shot, preset.tokens_per_frame)
        decoder = self.vae.streaming_decoder()
        latent_shape = (preset.vae.z_dim, preset.latent_height, preset.latent_width)
        rollout = self.sampler.rollout(cond, preset.frames_per_shot, cache, noise, latent_shape)
        kept: dict[int, torch.Tensor] = {}
        for chunk in range(preset.chunks_per_shot):
            tic = time.perf_counter()
            x0 = next(rollout)  # (1, C, f, h, w)
            _synchronize(self.device)  # honest per-stage timings on accelerators (decode syncs anyway)
            toc = time.perf_counter()
            pixels = decoder.decode(x0)  # (1, 3, t, H, W) in [-1, 1]
            kept |= {i: pixels[0, :, i - start] for i in range(start, start + pixels.shape[2]) if i in keep}
            start += pixels.shape[2]
            frames = to_uint8(pixels)
            done = ShotChunk(
                frames, story.num_shots, chunk, preset.chunks_per_shot, toc - tic, time.perf_counter() - toc
            )
            if done.is_last:
                story.shots.append(self._memory(prompt, kept))
                done.story = story
            yield done

    def _memory(self, prompt: str, kept: dict[int, torch.Tensor]) -> ShotMemory:
        """Encode the reusable frames, one frame at a time, into the shot's CPU memory."""
        indices = sorted(kept)
        latents = self.vae.encode_frames(torch.stack([kept[i] for i in indices]))  # (1, C, n, h, w)
        frame_latents = {i: latents[0, :, n].float().cpu().clone() for n, i in enumerate(indices)}  # own storage
        return ShotMemory(prompt, self.preset.pixel_frames_per_shot, frame_latents)


def _synchronize(device: torch.device) -> None:
    if device.type != "cpu":
        torch.accelerator.synchronize(device)
