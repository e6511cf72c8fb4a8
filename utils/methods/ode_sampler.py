"""The one sampler: integrate dx/dt = v_theta(x, t, mask[, classes]) from t = 0 (the prior) to t = 1 (an image)."""

from __future__ import annotations

import torch
from flow_matching.solver import ODESolver

from utils.methods.networks import VelocityAdapter


def time_grid(num_steps: int, device=None) -> torch.Tensor:
    """[0, 1/N, ..., 1]: N steps. (``linspace(0, 1, N)`` would be N - 1 steps, and none at N = 1.)"""
    return torch.linspace(0.0, 1.0, num_steps + 1, device=device)


@torch.no_grad()
def sample(
    adapter: VelocityAdapter, x_0: torch.Tensor, mask: torch.Tensor, num_steps: int, method: str = "euler",
    classes: torch.Tensor | None = None,
) -> torch.Tensor:
    """Solve the ODE with ``num_steps`` steps of the fixed-grid ``method``; returns x_1 (B, 1, H, W).

    ``classes`` (B,) go to a class-conditional network. ``adapter.nfe`` counts the network evaluations made
    (``num_steps`` for Euler, twice that for midpoint, twice again with guidance).
    """
    solver = ODESolver(velocity_model=adapter)
    conditions = {"mask": mask} if classes is None else {"mask": mask, "classes": classes}
    return solver.sample(
        x_init=x_0, step_size=None, method=method, time_grid=time_grid(num_steps, x_0.device), **conditions
    )
