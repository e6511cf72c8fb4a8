import pytest
import torch

from utils.methods.networks import VelocityAdapter
from utils.methods.ode_sampler import motfm_time_grid, sample, time_grid


class Field(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x, t, mask):
        assert t.shape == (x.shape[0],)
        return self.fn(x, t.view(-1, 1, 1, 1))


def _run(fn, steps, method="euler", x_0=None):
    a = VelocityAdapter(Field(fn))
    x_0 = torch.zeros(3, 1, 4, 4) if x_0 is None else x_0
    return sample(a, x_0, torch.zeros_like(x_0, dtype=torch.uint8), steps, method), a.nfe


def test_constant_field_moves_x0_by_c_even_in_one_step():
    x_0 = torch.randn(3, 1, 4, 4)
    for steps in (1, 4, 10):
        x_1, nfe = _run(lambda x, t: torch.full_like(x, 2.5), steps, x_0=x_0)
        torch.testing.assert_close(x_1, x_0 + 2.5)
        assert nfe == steps


def test_cubic_field_reaches_one_with_an_exact_method():
    x_1, nfe = _run(lambda x, t: 3 * t**2 * torch.ones_like(x), 2, "rk4")
    torch.testing.assert_close(x_1, torch.ones_like(x_1))
    assert nfe == 8


def test_euler_on_cubic_matches_the_left_riemann_sum():
    n = 5
    x_1, _ = _run(lambda x, t: 3 * t**2 * torch.ones_like(x), n)
    expected = sum(3 * (k / n) ** 2 / n for k in range(n))
    torch.testing.assert_close(x_1, torch.full_like(x_1, expected))


def test_nfe_per_method():
    for method, per_step in (("euler", 1), ("midpoint", 2), ("heun3", 3), ("rk4", 4)):
        _, nfe = _run(lambda x, t: x, 3, method)
        assert nfe == 3 * per_step, method


def test_time_grid_has_n_steps():
    assert time_grid(1).tolist() == [0.0, 1.0]
    assert len(time_grid(10)) == 11


@pytest.mark.parametrize("num_steps", [1, 3, 4, 10, 27, 37, 50])
def test_motfms_grid_is_torchdiffeqs_fixed_step_grid(num_steps):
    """MOTFM passes step_size 1 / N to torchdiffeq (through flow_matching's ODESolver): its grid, built by
    torchdiffeq itself, is the one motfm_time_grid gives."""
    from torchdiffeq._impl.solvers import FixedGridODESolver

    expected = FixedGridODESolver._grid_constructor_from_step_size(1.0 / num_steps)(None, None, torch.tensor([0., 1.]))
    assert torch.equal(motfm_time_grid(num_steps), expected)


def test_motfms_grid_floors_to_other_integer_times_than_ours_at_some_step_counts():
    floored = lambda grid: (grid * 999).floor()  # noqa: E731  MOTFM's network time
    assert torch.equal(floored(motfm_time_grid(10)), floored(time_grid(10)))
    assert not torch.equal(floored(motfm_time_grid(3)), floored(time_grid(3)))
