"""The one sampler: integrate dx/dt = v_theta(x, t, mask[, classes]) from t = t0 (0: the prior) to t = 1 (an
image)."""

from __future__ import annotations

import torch
from flow_matching.solver import ODESolver

from utils.methods.networks import VelocityAdapter

# Network evaluations per step of each fixed-grid ODE solver.
NFE_PER_STEP = {"euler": 1, "midpoint": 2, "heun3": 3, "rk4": 4}


def reference_steps(num_steps: int, t0: float) -> int:
    """Steps from t0 to 1 at the N-step grid's step size: round((1 - t0) N); N at t0 = 0, none at t0 = 1."""
    return round((1.0 - t0) * num_steps)


def time_grid(num_steps: int, device=None, t0: float = 0.0) -> torch.Tensor:
    """[t0, ..., 1] with :func:`reference_steps` steps; [0, 1/N, ..., 1] at t0 = 0. (``linspace(0, 1, N)`` would
    be N - 1 steps, and none at N = 1.)"""
    return torch.linspace(t0, 1.0, reference_steps(num_steps, t0) + 1, device=device)


def motfm_time_grid(num_steps: int, device=None) -> torch.Tensor:
    """MOTFM's grid: its solver passes ``step_size`` 1 / N to torchdiffeq, whose fixed-step grid is k * step_size
    in float32 for k < ceil(1 / step_size + 1), the last point set to 1. Under MOTFM's floor(t * 999) it can
    differ from :func:`time_grid` by one integer time (N = 3, 6, 12, 15, 24, 27, ... of 1 to 59)."""
    ends, step = torch.tensor([0.0, 1.0], device=device), 1.0 / num_steps
    points = int(torch.ceil((ends[1] - ends[0]) / step + 1).item())
    grid = torch.arange(0, points, dtype=ends.dtype, device=device) * step + ends[0]
    grid[-1] = ends[1]
    return grid


@torch.no_grad()
def sample(
    adapter: VelocityAdapter, x_0: torch.Tensor, mask: torch.Tensor, num_steps: int, method: str = "euler",
    t0: float = 0.0, classes: torch.Tensor | None = None, motfm_grid: bool = False,
) -> torch.Tensor:
    """Solve the ODE from ``x_0`` (B, 1, H, W) or (B, 1, D, H, W) at time ``t0`` with the fixed-grid ``method``;
    returns x_1 like it.

    ``num_steps`` steps from t0 = 0 (the prior); from a later t0 (a state on the path, e.g. towards a reference
    image) the steps of the same size that remain, :func:`reference_steps`; at t0 = 1 ``x_0`` itself.
    ``classes`` (B,) go to a class-conditional network. ``adapter.nfe`` counts the network evaluations made
    (the steps for Euler, twice that for midpoint, twice again with guidance). ``motfm_grid`` (from t0 = 0
    only) steps on :func:`motfm_time_grid`.
    """
    grid = motfm_time_grid(num_steps, x_0.device) if motfm_grid and t0 == 0 else time_grid(num_steps, x_0.device, t0)
    if len(grid) == 1:
        return x_0
    solver = ODESolver(velocity_model=adapter)
    conditions = {"mask": mask} if classes is None else {"mask": mask, "classes": classes}
    return solver.sample(x_init=x_0, step_size=None, method=method, time_grid=grid, **conditions)
