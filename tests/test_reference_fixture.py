"""Our model == the official ShotStream code (fp32, CPU) on the official-tiny fixture.

The fixture (tests/fixtures/official-tiny, copied from shared/fixtures) holds one teacher forward and
every generator call of a 5-shot causal rollout recorded from the unmodified reference pipeline.
Tolerance: 1e-4 relative to the output scale (observed: ~5e-6 absolute).
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import FIXTURE, fixture_transformer, wrapper_to_diffusers
from safetensors.torch import load_file

from shotstream.context_sampling import plan_context
from shotstream.sampling import GeneratorNoise, ShotConditioning, StudentSampler
from shotstream.scheduler import FlowMatchTable

SHOTS, FRAMES, CONTEXT, PIXELS_PER_SHOT = 5, 21, 6, 81


def assert_close(ours: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    scale = ref.abs().max().clamp_min(1.0)
    err = (ours - ref).abs().max().item()
    assert err <= 1e-4 * scale, f"{what}: max |diff| {err:.3g} (scale {scale:.3g})"


def test_schedule_constants():
    config = json.loads((FIXTURE / "config.json").read_text())["student"]
    table = FlowMatchTable(shift=config["timestep_shift"])
    warped = table.warp(tuple(config["denoising_step_list_nominal"]))
    assert warped.tolist() == config["timesteps"]  # bit-exact float32
    assert table.sigma(torch.tensor([500.0])).item() == pytest.approx(0.499718636, abs=1e-9)
    assert table.sigma(torch.tensor([0.0])).item() == pytest.approx(0.0079444, abs=1e-7)
    assert table.warp((1001,)).item() == 0.0


def test_teacher_forward_matches_reference():
    case = load_file(str(FIXTURE / "teacher_case.safetensors"))
    model = fixture_transformer()
    latents = wrapper_to_diffusers(case["latents"])  # (1, 16, 27, 4, 6)
    with torch.no_grad():
        flow = model(latents, case["timestep"], case["caption_embeds"], case["shot_flags"], torch.arange(27))
        x0 = FlowMatchTable().flow_to_x0(flow, latents, case["timestep"])
    assert_close(flow, wrapper_to_diffusers(case["flow_pred"]), "teacher flow")
    assert_close(x0, wrapper_to_diffusers(case["x0_pred"]), "teacher x0")


class RecordedNoise:
    """Injects the reference's recorded draws (initial noise per shot, re-noise per step)."""

    def __init__(self, trace):
        self.trace, self.shot, self.renoise_index = trace, 0, 0

    def initial(self, shape):
        noise = wrapper_to_diffusers(self.trace[f"shot{self.shot}.initial_noise"])
        self.shot += 1
        return noise

    def renoise(self, shape):
        noise = self.trace[f"renoise{self.renoise_index:03d}.noise"]  # (f, C, h, w) flattened batch
        self.renoise_index += 1
        return noise.unsqueeze(0).permute(0, 2, 1, 3, 4)


def context_latents(finals, ranges, plan):
    """The fixture's stand-in VAE: pixel frame p of a shot is latent (p + 3) // 4 (README §5)."""
    if not plan.frames:
        return torch.zeros(1, 16, CONTEXT, 4, 6)
    picks = [finals[shot][:, :, (p - ranges[shot][0] + 3) // 4] for shot, p in plan.frames]
    return torch.stack(picks, dim=2)


def test_student_rollout_matches_reference_call_by_call(trace):
    model = fixture_transformer()
    sampler = StudentSampler(model, FlowMatchTable(), FlowMatchTable().warp((1000, 740, 500, 260)), 3)
    calls = []
    model.register_forward_hook(lambda module, args, out: calls.append(out), with_kwargs=False)
    noise = RecordedNoise(trace)
    finals, ranges = [], []
    with torch.no_grad():
        for shot in range(SHOTS):
            plan = plan_context(ranges, CONTEXT)
            latents = context_latents(finals, ranges, plan)
            assert_close(latents, wrapper_to_diffusers(trace[f"shot{shot}.context_latents"]), "context latents")
            cond = ShotConditioning(
                latents, torch.tensor(plan.flags), plan.shot_flag, trace["caption_embeds"][: shot + 1]
            )
            cache = model.new_cache(1, CONTEXT, FRAMES, tokens_per_frame=6)
            sampler.insert_context(cond, cache)
            check_context_cache(cache, trace, call=36 * shot)
            x = noise.initial(None)
            chunks = []
            for chunk in range(FRAMES // 3):
                x0 = sampler.denoise_chunk(x[:, :, 3 * chunk : 3 * chunk + 3], chunk, cond, cache, noise)
                sampler.commit_chunk(x0, chunk, cond, cache)
                chunks.append(x0)
            check_local_cache(cache, trace, call=36 * shot + 35)
            finals.append(torch.cat(chunks, dim=2))
            ranges.append((PIXELS_PER_SHOT * shot, PIXELS_PER_SHOT * shot + PIXELS_PER_SHOT - 1))
            assert_close(finals[-1], wrapper_to_diffusers(trace[f"shot{shot}.final_latents"]), f"shot {shot}")
    assert len(calls) == 36 * SHOTS
    for i, flow in enumerate(calls):
        assert_close(flow, wrapper_to_diffusers(trace[f"call{i:03d}.flow"]), f"call {i} flow")


def check_context_cache(cache, trace, call):
    for layer in range(2):
        key, value = cache.global_cache(layer)
        assert_close(key, trace[f"call{call:03d}.dbg_context_cache_block{layer}_k"], "global cache k")
        assert_close(value, trace[f"call{call:03d}.dbg_context_cache_block{layer}_v"], "global cache v")
        text_k, text_v = cache.text[layer]
        assert_close(text_k, trace[f"call{call:03d}.dbg_crossattn_cache_block{layer}_k"], "text cache k")
        assert_close(text_v, trace[f"call{call:03d}.dbg_crossattn_cache_block{layer}_v"], "text cache v")


def check_local_cache(cache, trace, call):
    for layer in range(2):
        key, value = cache.local_cache(layer)
        assert_close(key, trace[f"call{call:03d}.dbg_local_cache_block{layer}_k"], "local cache k")
        assert_close(value, trace[f"call{call:03d}.dbg_local_cache_block{layer}_v"], "local cache v")


def test_seeded_noise_stream_is_the_reference_stream(trace):
    """`GeneratorNoise` with seed 0 reproduces the reference's recorded draws bit for bit."""
    noise = GeneratorNoise(torch.Generator().manual_seed(0), torch.device("cpu"), torch.float32)
    renoise = 0
    for shot in range(SHOTS):
        initial = noise.initial((1, 16, FRAMES, 4, 6))
        assert torch.equal(initial, wrapper_to_diffusers(trace[f"shot{shot}.initial_noise"]))
        for _ in range(FRAMES // 3 * 3):
            draw = noise.renoise((1, 16, 3, 4, 6))
            expected = trace[f"renoise{renoise:03d}.noise"].unsqueeze(0).permute(0, 2, 1, 3, 4)
            assert torch.equal(draw, expected)
            renoise += 1


def test_renoise_is_bit_exact(trace):
    table = FlowMatchTable()
    x0 = wrapper_to_diffusers(trace["call001.x0"])
    noise = trace["renoise000.noise"].unsqueeze(0).permute(0, 2, 1, 3, 4)
    t = trace["renoise000.timestep"][None]  # (1, 3)
    expected = trace["renoise000.result"].unsqueeze(0).permute(0, 2, 1, 3, 4)
    assert torch.equal(table.add_noise(x0, noise, t), expected)
