import pytest
import torch

from utils.methods.networks import VelocityAdapter
from utils.methods.ode_sampler import NFE_PER_STEP, motfm_time_grid, sample, time_grid


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


def _odesolver_sample(adapter, x_0, mask, num_steps, method, t0=0.0, classes=None, motfm_grid=False):
    """The sampler as it was: flow_matching's ODESolver (torchdiffeq's fixed-grid solvers) on the same grids."""
    from flow_matching.solver import ODESolver

    grid = motfm_time_grid(num_steps) if motfm_grid else time_grid(num_steps, t0=t0)
    conditions = {"mask": mask} if classes is None else {"mask": mask, "classes": classes}
    return ODESolver(velocity_model=adapter).sample(x_init=x_0, step_size=None, method=method, time_grid=grid,
                                                    **conditions)


def _tiny_network(conditioning):
    """The tiny config's UNet + ControlNet (16 x 16 inputs suffice) with random weights."""
    from utils.methods import load_config
    from utils.methods.networks import build_model

    classes = 3 if conditioning.uses_class else 0
    model = build_model(load_config("configs/tiny.yaml").model_args, 4, conditioning, classes)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model.eval()


def _inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 1, 16, 16, generator=g), torch.randint(0, 4, (2, 1, 16, 16), generator=g, dtype=torch.uint8)


@pytest.fixture(scope="module")
def class_network():
    from utils.config import ConditioningConfig

    return _tiny_network(ConditioningConfig(mode="mask+class"))


@pytest.mark.parametrize("method", ["euler", "midpoint", "heun3", "rk4"])
@pytest.mark.parametrize("t0, classes, motfm_grid", [(0.0, [0, 2], False), (0.5, [1, -1], False),
                                                     (0.0, [2, 0], True)])
def test_the_host_grid_sampler_is_odesolver_bit_for_bit(class_network, method, t0, classes, motfm_grid):
    (x_0, mask), classes = _inputs(), torch.tensor(classes)
    steps = 3 if motfm_grid else 4  # N = 3: MOTFM's grid differs from ours
    new, old = VelocityAdapter(class_network), VelocityAdapter(class_network)
    got = sample(new, x_0, mask, steps, method, t0, classes, motfm_grid)
    want = _odesolver_sample(old, x_0, mask, steps, method, t0, classes, motfm_grid)
    assert (got - x_0).abs().max() > 0.1  # the network moved the state
    assert torch.equal(got, want), (got - want).abs().max()
    assert new.nfe == old.nfe == round((1 - t0) * steps) * NFE_PER_STEP[method]


@pytest.mark.parametrize("t0", [0.0, 0.5])
def test_the_host_grid_sampler_is_odesolver_bit_for_bit_without_classes(t0):
    from utils.config import ConditioningConfig

    network, (x_0, mask) = _tiny_network(ConditioningConfig()), _inputs()
    for method in NFE_PER_STEP:
        got = sample(VelocityAdapter(network), x_0, mask, 4, method, t0)
        assert torch.equal(got, _odesolver_sample(VelocityAdapter(network), x_0, mask, 4, method, t0)), method
