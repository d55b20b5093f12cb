"""The flow-matching noise schedule of ShotStream (reference `utils/scheduler.py:FlowMatchScheduler`).

Rectified flow: `x_t = (1 - sigma) x0 + sigma eps`, the model predicts the flow `v = eps - x0`.
Training and the student use a 1000-entry table with shift 8 (`shift s / (1 + (shift-1) s)`, sigma_min 0,
one extra step so sigma = 0 is *not* in the table); the teacher samples with a 50-step Euler table.
Timesteps are `1000 * sigma`; any timestep is mapped to the nearest table entry.
"""

from __future__ import annotations

import torch


def shifted_sigmas(num_steps: int, shift: float) -> torch.Tensor:
    """`num_steps` sigmas from 1 towards 0 (0 excluded), shifted; float32 like the reference."""
    s = torch.linspace(1.0, 0.0, num_steps + 1)[:-1]
    return shift * s / (1 + (shift - 1) * s)


class FlowMatchTable:
    """The 1000-step training table and the conversions built on it.

    All lookups are nearest-entry on `timesteps` (so bf16-rounded or warped timesteps work).
    Tensors are float32 on CPU; results follow the device of the inputs.
    """

    def __init__(self, shift: float = 8.0, num_train_timesteps: int = 1000) -> None:
        self.shift = shift
        self.num_train_timesteps = num_train_timesteps
        self.sigmas = shifted_sigmas(num_train_timesteps, shift)  # (1000,) 1.0 .. 0.0079
        self.timesteps = self.sigmas * num_train_timesteps  # (1000,) 1000 .. 7.94
        y = torch.exp(-2 * ((self.timesteps - num_train_timesteps / 2) / num_train_timesteps) ** 2)
        y_shifted = y - y.min()
        self.weights = y_shifted * (num_train_timesteps / y_shifted.sum())  # teacher loss weight

    def index(self, timestep: torch.Tensor) -> torch.Tensor:
        """Nearest table index of each timestep, any shape -> same shape (int64)."""
        t = timestep.detach().float().cpu().reshape(-1, 1)
        return (self.timesteps[None] - t).abs().argmin(dim=1).reshape(timestep.shape)

    def sigma(self, timestep: torch.Tensor) -> torch.Tensor:
        """sigma of the nearest table entry, float32, on the device of `timestep`."""
        return self.sigmas[self.index(timestep)].to(timestep.device)

    def training_weight(self, timestep: torch.Tensor) -> torch.Tensor:
        return self.weights[self.index(timestep)].to(timestep.device)

    def warp(self, nominal_steps: tuple[int, ...]) -> torch.Tensor:
        """Warped denoising steps: `cat(timesteps, [0])[1000 - step]` (1001 -> t = 0)."""
        table = torch.cat([self.timesteps, torch.zeros(1)])
        return table[self.num_train_timesteps - torch.tensor(nominal_steps, dtype=torch.long)]

    def sample_timestep(self, shape: tuple[int, ...], generator: torch.Generator | None = None) -> torch.Tensor:
        """Uniform table timesteps `timesteps[U{0..999}]`, float32 on CPU."""
        idx = torch.randint(0, self.num_train_timesteps, shape, generator=generator)
        return self.timesteps[idx]

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        """`(1 - sigma) x0 + sigma noise`; `timestep` broadcasts against the frame axis.

        Args:
            x0, noise: latents of shape `(B, C, F, H, W)`.
            timestep: `(B, F)` per-frame or `(B,)` per-sample timesteps.
        """
        sigma = _per_frame(self.sigma(timestep), x0)
        return ((1 - sigma) * x0 + sigma * noise).type_as(noise)

    def flow_to_x0(self, flow: torch.Tensor, x_t: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        """`x0 = x_t - sigma v`, computed in float64 and cast back (reference numerics)."""
        sigma = _per_frame(self.sigma(timestep), x_t).double()
        return (x_t.double() - sigma * flow.double()).to(flow.dtype)

    def x0_to_flow(self, x0: torch.Tensor, x_t: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        """`v = (x_t - x0) / sigma`, in float64."""
        sigma = _per_frame(self.sigma(timestep), x_t).double()
        return ((x_t.double() - x0.double()) / sigma).to(x0.dtype)


class EulerSampler:
    """The teacher's Euler sampler over `num_steps` shifted sigmas (reference `set_timesteps` + `step`)."""

    def __init__(self, num_steps: int = 50, shift: float = 8.0, num_train_timesteps: int = 1000) -> None:
        self.sigmas = shifted_sigmas(num_steps, shift)  # (num_steps,)
        self.timesteps = self.sigmas * num_train_timesteps
        self.next_sigmas = torch.cat([self.sigmas[1:], torch.zeros(1)])  # the last step goes to sigma 0

    def step(self, flow: torch.Tensor, i: int, x: torch.Tensor) -> torch.Tensor:
        """One Euler step from `timesteps[i]`: `x + v (sigma_next - sigma)`."""
        return x + flow * (self.next_sigmas[i] - self.sigmas[i]).item()


def _per_frame(sigma: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Broadcast `(B,)` or `(B, F)` sigmas against `(B, C, F, H, W)` latents."""
    if sigma.ndim == 1:
        return sigma.reshape(-1, 1, 1, 1, 1)
    return sigma[:, None, :, None, None]
