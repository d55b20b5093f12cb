"""The training losses of ShotStream as pure functions (reference §5). Latents are `(B, C, F, h, w)`.

Only the generated / target frames are passed in: callers slice the context frames off first.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def flow_matching_loss(
    flow_pred: torch.Tensor, noise: torch.Tensor, x0: torch.Tensor, weight: torch.Tensor
) -> torch.Tensor:
    """Teacher loss (§5.1): `w(t) * MSE(v_pred, eps - x0)`, mean per sample in float32, then over the batch.

    Args:
        flow_pred, noise, x0: `(B, C, F, h, w)`; weight: `(B,)` the schedule's `training_weight(t)`.
    """
    per_sample = (flow_pred.float() - (noise - x0).float()).pow(2).flatten(1).mean(dim=1)  # (B,)
    return (per_sample * weight.float()).mean()


def ode_regression_loss(x0_pred: torch.Tensor, x0_target: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
    """Causal-init loss (§5.3): MSE between predicted and teacher x0 on the frames with t > 0 only.

    Args:
        x0_pred, x0_target: `(B, C, F, h, w)`; timestep: `(B, F)` per-frame input timesteps.
    Frames given the clean ODE end point (t = 0) carry no signal; if every frame is clean the loss is 0.
    """
    noisy = timestep > 0  # (B, F)
    if not noisy.any():
        return x0_pred.sum() * 0.0
    pred = x0_pred.float().permute(0, 2, 1, 3, 4)[noisy]  # (n, C, h, w)
    target = x0_target.float().permute(0, 2, 1, 3, 4)[noisy]
    return F.mse_loss(pred, target)


def dmd_generator_loss(
    x: torch.Tensor,
    real_cond: torch.Tensor,
    real_uncond: torch.Tensor,
    fake: torch.Tensor,
    guidance: float,
) -> torch.Tensor:
    """Distribution-matching loss of the generator (§5.4; DMD eq. 7 with its normaliser, eq. 8).

    Args:
        x: `(B, C, F, h, w)` the generator's sample, carrying gradients.
        real_cond, real_uncond: x0 predictions of the frozen real score with the captions / negative prompt.
        fake: x0 prediction of the critic (fake score) with the captions.
        guidance: `g` in `real = cond + g (cond - uncond)` (reference 3.0, i.e. CFG 4 in `u + s (c - u)`).

    Its gradient with respect to `x` is `(fake - real) / mean|x - real| / numel(x)` (per sample normaliser).
    """
    with torch.no_grad():
        real = real_cond + guidance * (real_cond - real_uncond)
        normaliser = (x - real).abs().mean(dim=(1, 2, 3, 4), keepdim=True)  # (B, 1, 1, 1, 1)
        grad = torch.nan_to_num((fake - real) / normaliser)
    return 0.5 * F.mse_loss(x.double(), (x.double() - grad.double()).detach())


def critic_flow_loss(flow_pred: torch.Tensor, noise: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """Critic (fake score) loss (§5.4, `FlowPredLoss`): MSE between its flow and `eps - x_gen`.

    The reference routes the flow through x0 and back in float64 (`(x_t - x0) / sigma`), the identity up to
    rounding, so the flow is compared directly.
    """
    return F.mse_loss(flow_pred.float(), (noise - x0).float())
