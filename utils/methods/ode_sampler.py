"""The one sampler: integrate dx/dt = v_theta(x, t, mask[, classes]) from t = t0 (0: the prior) to t = 1 (an
image).

The fixed-grid Runge-Kutta steps are written out here rather than run through flow_matching's ODESolver:
torchdiffeq compares and asserts on device tensors at every step (>= 3 device-to-host syncs per step on a GPU),
which stalls the host and rules out CUDA graphs. The times live on the host instead, and each step evaluates
exactly torchdiffeq's expressions in its order, so the results are bit for bit those of ``ODESolver``
(tests/test_sampling.py compares them).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from utils.methods.networks import VelocityAdapter

Field = Callable[[torch.Tensor, float], torch.Tensor]  # v(x, t) at a host time t


def _euler(v: Field, x: torch.Tensor, dt: float, t: list[float]) -> torch.Tensor:
    return x + dt * v(x, t[0])


def _midpoint(v: Field, x: torch.Tensor, dt: float, t: list[float]) -> torch.Tensor:
    return x + dt * v(x + v(x, t[0]) * (0.5 * dt), t[1])


def _heun3(v: Field, x: torch.Tensor, dt: float, t: list[float]) -> torch.Tensor:
    """Heun's third-order method (c = 0, 1/3, 2/3; b = 1/4, 0, 3/4); torchdiffeq's zero tableau entries dropped."""
    k1 = v(x, t[0])
    k2 = v(x + dt * k1 * (1 / 3), t[1])
    k3 = v(x + dt * (k2 * (2 / 3)), t[2])
    return x + dt * (k1 * 0.25 + k3 * 0.75)


def _rk4(v: Field, x: torch.Tensor, dt: float, t: list[float]) -> torch.Tensor:
    """The 3/8-rule RK4, which torchdiffeq's "rk4" is (``rk4_alt_step_func``), not the classic 1/6 rule."""
    k1 = v(x, t[0])
    k2 = v(x + dt * k1 * (1 / 3), t[1])
    k3 = v(x + dt * (k2 - k1 * (1 / 3)), t[2])
    k4 = v(x + dt * (k1 - k2 + k3), t[3])
    return x + (k1 + 3 * (k2 + k3) + k4) * dt * 0.125


# Each method's step and the fractions c of a step at which its inner stages evaluate the field (t0 + c dt);
# the first stage is at t0 and, for rk4, the last at t1.
METHODS = {"euler": (_euler, ()), "midpoint": (_midpoint, (0.5,)), "heun3": (_heun3, (1 / 3, 2 / 3)),
           "rk4": (_rk4, (1 / 3, 2 / 3))}
# Network evaluations per step of each fixed-grid ODE solver.
NFE_PER_STEP = {"euler": 1, "midpoint": 2, "heun3": 3, "rk4": 4}


def reference_steps(num_steps: int, t0: float) -> int:
    """Steps from t0 to 1 at the N-step grid's step size: round((1 - t0) N); N at t0 = 0, none at t0 = 1."""
    return round((1.0 - t0) * num_steps)


def time_grid(num_steps: int, t0: float = 0.0) -> torch.Tensor:
    """[t0, ..., 1] on the CPU with :func:`reference_steps` steps; [0, 1/N, ..., 1] at t0 = 0. (``linspace(0, 1,
    N)`` would be N - 1 steps, and none at N = 1.)"""
    return torch.linspace(t0, 1.0, reference_steps(num_steps, t0) + 1)


def motfm_time_grid(num_steps: int) -> torch.Tensor:
    """MOTFM's grid: its solver passes ``step_size`` 1 / N to torchdiffeq, whose fixed-step grid is k * step_size
    in float32 for k < ceil(1 / step_size + 1), the last point set to 1. Under MOTFM's floor(t * 999) it can
    differ from :func:`time_grid` by one integer time (N = 3, 6, 12, 15, 24, 27, ... of 1 to 59)."""
    ends, step = torch.tensor([0.0, 1.0]), 1.0 / num_steps
    points = int(torch.ceil((ends[1] - ends[0]) / step + 1).item())
    grid = torch.arange(0, points, dtype=ends.dtype) * step + ends[0]
    grid[-1] = ends[1]
    return grid


def host_steps(grid: torch.Tensor, fractions: tuple[float, ...]) -> list[tuple[float, list[float]]]:
    """(dt, [t0, t0 + c dt for c in ``fractions``, t1]) per step of the float32 CPU ``grid``, as Python floats.

    Computed in float32 with torchdiffeq's expressions (dt = t1 - t0, then t0 + dt * c), so the network sees the
    times it saw under ``ODESolver``; float32 values are exact as Python floats and as the scalar of a float32
    multiplication.
    """
    t0, t1 = grid[:-1], grid[1:]
    dt = t1 - t0
    times = [t0, *(t0 + dt * c for c in fractions), t1]
    return list(zip(dt.tolist(), torch.stack(times, 1).tolist()))


@torch.no_grad()
def sample(
    adapter: VelocityAdapter, x_0: torch.Tensor, mask: torch.Tensor, num_steps: int, method: str = "euler",
    t0: float = 0.0, classes: torch.Tensor | None = None, motfm_grid: bool = False,
) -> torch.Tensor:
    """Solve the ODE from ``x_0`` (B, 1, H, W) or (B, 1, D, H, W) at time ``t0`` with the fixed-grid ``method``
    (one of :data:`METHODS`); returns x_1 like it.

    ``num_steps`` steps from t0 = 0 (the prior); from a later t0 (a state on the path, e.g. towards a reference
    image) the steps of the same size that remain, :func:`reference_steps`; at t0 = 1 ``x_0`` itself.
    ``classes`` (B,) go to a class-conditional network. ``adapter.nfe`` counts the network evaluations made
    (the steps for Euler, twice that for midpoint, twice again with guidance). ``motfm_grid`` (from t0 = 0
    only) steps on :func:`motfm_time_grid`. The time grid is built on the CPU: no step reads the device.
    """
    grid = motfm_time_grid(num_steps) if motfm_grid and t0 == 0 else time_grid(num_steps, t0=t0)
    step, fractions = METHODS[method]
    conditions = {"mask": mask} if classes is None else {"mask": mask, "classes": classes}

    def velocity(x: torch.Tensor, t: float) -> torch.Tensor:
        return adapter(x=x, t=torch.full((x.shape[0],), t, dtype=x.dtype, device=x.device), **conditions)

    x = x_0
    for dt, times in host_steps(grid, fractions):
        x = step(velocity, x, dt, times)
    return x
