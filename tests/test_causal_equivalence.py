"""The cached chunk-by-chunk rollout equals one block-causal masked forward (the training path).

For chunk b and each of its calls (4 denoising steps and the clean re-run), the masked forward over
[context (t=0) | clean chunks < b (t=0) | this call's input (its t)] must give the same output for the
last chunk as the cached call, which saw the same tokens through the dual KV cache.
"""

from __future__ import annotations

import pytest
import torch
from conftest import random_transformer

from shotstream.block_mask import block_causal_mask
from shotstream.sampling import GeneratorNoise, ShotConditioning, StudentSampler
from shotstream.scheduler import FlowMatchTable

CONTEXT, CHUNK, CHUNKS, GRID = 4, 2, 3, (2, 3)


def rollout_calls(model, cond, frames):
    """Run the cached rollout, recording (input, timestep, output) of every chunk call."""
    calls = []

    def record(module, args, kwargs, output):
        if kwargs["cache_frame"] > 0:
            calls.append((args[0], args[1], output))

    handle = model.register_forward_hook(record, with_kwargs=True)
    table = FlowMatchTable()
    sampler = StudentSampler(model, table, table.warp((1000, 740, 500, 260)), CHUNK)
    noise = GeneratorNoise(torch.Generator().manual_seed(1), torch.device("cpu"), torch.float64)
    cache = model.new_cache(1, CONTEXT, frames, tokens_per_frame=GRID[0] * GRID[1])
    shape = (16, GRID[0] * 2, GRID[1] * 2)
    chunks = list(sampler.rollout(cond, frames, cache, noise, shape))
    handle.remove()
    return calls, chunks


@pytest.mark.parametrize("num_captions", [1, 3])
def test_cached_rollout_equals_block_causal_forward(num_captions):
    model = random_transformer(seed=3, dtype=torch.float64)
    torch.manual_seed(0)
    cond = ShotConditioning(
        context_latents=torch.randn(1, 16, CONTEXT, 4, 6, dtype=torch.float64),
        context_flags=torch.tensor([0, 0, 1, 1]) if num_captions > 1 else torch.zeros(4, dtype=torch.long),
        shot_flag=2 if num_captions > 1 else 1,
        caption_embeds=torch.randn(num_captions, 5, 16, dtype=torch.float64),
    )
    with torch.no_grad():
        calls, chunks = rollout_calls(model, cond, CHUNK * CHUNKS)
        assert len(calls) == CHUNKS * 5
        for i, (x, t, cached_out) in enumerate(calls):
            b = i // 5
            frames = torch.cat([cond.context_latents, *chunks[:b], x], dim=2)
            timestep = torch.cat([torch.zeros(1, CONTEXT + b * CHUNK, dtype=torch.float64), t.double()], dim=1)
            flags = torch.tensor(cond.context_flags.tolist() + [cond.shot_flag] * (b + 1) * CHUNK)
            mask = block_causal_mask(CONTEXT, (b + 1) * CHUNK, CHUNK, GRID[0] * GRID[1])
            full = model(
                frames, timestep, cond.caption_embeds, flags, torch.arange(frames.shape[2]), attention_mask=mask
            )
            torch.testing.assert_close(full[:, :, -CHUNK:], cached_out, rtol=1e-10, atol=1e-10)


def test_mask_matters():
    """Sanity: without the mask the last chunk's output differs (the check above is not vacuous)."""
    model = random_transformer(seed=3, dtype=torch.float64)
    x = torch.randn(1, 16, CONTEXT + 2 * CHUNK, 4, 6, dtype=torch.float64)
    t = torch.full((1, x.shape[2]), 500.0, dtype=torch.float64)
    args = (x, t, torch.randn(1, 5, 16, dtype=torch.float64), torch.zeros(x.shape[2], dtype=torch.long))
    with torch.no_grad():
        masked = model(*args, torch.arange(x.shape[2]), attention_mask=block_causal_mask(CONTEXT, 2 * CHUNK, CHUNK, 6))
        full = model(*args, torch.arange(x.shape[2]))
    assert (masked[:, :, :CONTEXT] - full[:, :, :CONTEXT]).abs().max() > 1e-3


def test_block_causal_mask_structure():
    mask = block_causal_mask(num_context_frames=2, num_frames=4, frames_per_chunk=2, tokens_per_frame=1)
    expected = torch.tensor(
        [
            [1, 1, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0],
            [1, 1, 1, 1, 0, 0],
            [1, 1, 1, 1, 0, 0],
            [1, 1, 1, 1, 1, 1],
            [1, 1, 1, 1, 1, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(mask, expected)


def test_shot_phase_ablation_removes_only_the_phase(tmp_path):
    """`shot_phase=0`: with one caption the flags no longer matter; the default phase makes them matter."""
    model = random_transformer()
    x = torch.randn(1, 16, 4, GRID[0] * 2, GRID[1] * 2)
    t, text = torch.full((1, 4), 500.0), torch.randn(1, 8, model.config.text_dim)
    cut, same = torch.tensor([0, 0, 1, 1]), torch.zeros(4, dtype=torch.int32)
    with torch.no_grad():
        assert not torch.allclose(model(x, t, text, cut, torch.arange(4)), model(x, t, text, same, torch.arange(4)))
        model.save_pretrained(tmp_path)
        ablated = type(model).from_pretrained(tmp_path, shot_phase=0.0)
        assert ablated.config.shot_phase == 0.0
        torch.testing.assert_close(
            ablated(x, t, text, cut, torch.arange(4)), ablated(x, t, text, same, torch.arange(4))
        )
