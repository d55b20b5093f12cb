"""The block-causal attention mask of the student's training forward (reference §5.3).

Context frames form group 0 and chunk i of the target forms group i + 1; a token may attend to every
token whose group is not later than its own. So the context sees only itself, and chunk i sees the
context, earlier chunks and itself (bidirectionally inside the chunk): exactly what the cached rollout
sees, which `tests/test_causal_equivalence.py` checks.
"""

from __future__ import annotations

import torch


def frame_groups(num_context_frames: int, num_frames: int, frames_per_chunk: int) -> torch.Tensor:
    """Group id per latent frame: 0 for context, `1 + chunk` for target frames. `(Nc + F,)` int64."""
    context = torch.zeros(num_context_frames, dtype=torch.long)
    target = 1 + torch.arange(num_frames) // frames_per_chunk
    return torch.cat([context, target])


def block_causal_mask(
    num_context_frames: int, num_frames: int, frames_per_chunk: int, tokens_per_frame: int
) -> torch.Tensor:
    """`(L, L)` bool mask (True = may attend), `L = (Nc + F) * tokens_per_frame`, frames outermost."""
    groups = frame_groups(num_context_frames, num_frames, frames_per_chunk).repeat_interleave(tokens_per_frame)
    return groups[:, None] >= groups[None, :]
