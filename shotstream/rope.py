"""3-axis RoPE with ShotStream's shot phase ("RoPE discontinuity indicator", reference §1.2).

Wan splits each head into temporal | height | width pairs (head_dim 128 -> 22 | 21 | 21 complex pairs).
ShotStream adds one constant phase to every *temporal* angle: `theta_t[k] = p * 10000^(-2k/d_t) + s / 6`,
where p is the frame's temporal position and s its shot flag. The phase is not a position shift: it marks
which shot a frame belongs to, so a hard cut is visible to attention even where positions are contiguous.

Positions and flags are chosen by the caller (see `sampling.py`): context frames take positions
0..Nc-1 and the index of the shot they came from; the shot being generated continues at Nc.
"""

from __future__ import annotations

import torch

SHOT_PHASE = 1 / 6  # radians added to every temporal angle per unit of shot flag


def rope_split(head_dim: int) -> tuple[int, int, int]:
    """Real dimensions per axis (temporal, height, width), as Wan and diffusers split them."""
    hw = 2 * (head_dim // 6)
    return head_dim - 2 * hw, hw, hw


def _inverse_frequencies(dim: int, theta: float) -> torch.Tensor:
    return 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)  # (dim/2,) float64


def shot_phase_angles(
    positions: torch.Tensor,
    shot_flags: torch.Tensor,
    grid: tuple[int, int],
    head_dim: int,
    theta: float = 10000.0,
    phase_step: float = SHOT_PHASE,
) -> torch.Tensor:
    """Rotation angles for every token, in (frame, row, column) token order.

    Args:
        positions: `(F,)` integer temporal position of each latent frame.
        shot_flags: `(F,)` integer shot flag of each latent frame.
        grid: `(rows, cols)` tokens per frame after patchify.
        head_dim: attention head dimension.
        theta: RoPE base.
        phase_step: radians per unit of shot flag (`SHOT_PHASE`; 0 disables the shot phase, an ablation).

    Returns:
        `(F * rows * cols, head_dim // 2)` float64 angles, one per complex pair.
    """
    t_dim, h_dim, w_dim = rope_split(head_dim)
    rows, cols = grid
    num_frames = positions.shape[0]
    # the phase is evaluated in float32 exactly like the reference (int32 flag * python float)
    phase = (shot_flags.to(torch.int32).cpu() * phase_step).double()  # (F,)
    angle_t = positions.cpu().double()[:, None] * _inverse_frequencies(t_dim, theta) + phase[:, None]
    angle_h = torch.arange(rows, dtype=torch.float64)[:, None] * _inverse_frequencies(h_dim, theta)
    angle_w = torch.arange(cols, dtype=torch.float64)[:, None] * _inverse_frequencies(w_dim, theta)
    angles = torch.cat(
        [
            angle_t[:, None, None].expand(num_frames, rows, cols, -1),
            angle_h[None, :, None].expand(num_frames, rows, cols, -1),
            angle_w[None, None, :].expand(num_frames, rows, cols, -1),
        ],
        dim=-1,
    )  # (F, rows, cols, head_dim/2)
    return angles.reshape(num_frames * rows * cols, head_dim // 2)


def rotary_tables(angles: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables `(1, L, 1, head_dim // 2)` in float32 on `device`."""
    cos = angles.cos().float()[None, :, None].to(device)
    sin = angles.sin().float()[None, :, None].to(device)
    return cos, sin


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive channel pairs of `x` `(B, L, heads, head_dim)`; computed in float32."""
    x1, x2 = x.float().unflatten(-1, (-1, 2)).unbind(-1)  # (B, L, heads, head_dim/2) each
    rotated = torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
    return rotated.flatten(-2).type_as(x)
