import math

import pytest
import torch

import diffusiongym as dg
from diffusiongym.noise import make_noise
from diffusiongym.timegrid import make_time_grid

SCHEDULERS = {
    "linear": dg.LinearScheduler(),
    "cosine": dg.CosineScheduler(),
    "vp": dg.DiscreteVPScheduler.linear_ddpm(),
}


@pytest.mark.parametrize("name", SCHEDULERS, ids=list(SCHEDULERS))
def test_derivatives_match_finite_differences(name):
    sched = SCHEDULERS[name]
    # For the piecewise-linear VP table, stay inside cells (derivative jumps at knots).
    if name == "vp":
        t = (torch.arange(50, 950, 25, dtype=torch.float64) + 0.5) / 999  # cell centres
    else:
        t = torch.linspace(0.05, 0.95, 37, dtype=torch.float64)
    eps = 1e-7 if name != "vp" else 1e-5 / 999
    for f, df in ((sched.alpha, sched.d_alpha), (sched.beta, sched.d_beta)):
        fd = (f(t + eps) - f(t - eps)) / (2 * eps)
        # central differences in float64: error O(eps^2 f''') + O(1e-16 / eps) < 1e-6
        torch.testing.assert_close(df(t), fd, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_boundary_values(name):
    sched = SCHEDULERS[name]
    a, b, _, _ = sched(torch.tensor([0.0, 1.0], dtype=torch.float64))
    torch.testing.assert_close(a, torch.tensor([0.0, 1.0], dtype=torch.float64), atol=1e-15, rtol=0)
    torch.testing.assert_close(b, torch.tensor([1.0, 0.0], dtype=torch.float64), atol=1e-15, rtol=0)


def test_vp_matches_diffusers_table_at_integer_timesteps():
    from diffusers import DDPMScheduler

    ddpm = DDPMScheduler(num_train_timesteps=1000)
    sched = dg.DiscreteVPScheduler(ddpm.alphas_cumprod)
    tau = torch.tensor([0, 1, 250, 500, 998, 999])
    t = 1 - tau.double() / 999
    torch.testing.assert_close(sched.alpha(t) ** 2, ddpm.alphas_cumprod[tau].double(), rtol=1e-6, atol=0)
    torch.testing.assert_close(sched.alpha(t) ** 2 + sched.beta(t) ** 2, torch.ones(6, dtype=torch.float64))
    torch.testing.assert_close(sched.timestep(t), tau.double())


def test_vp_validates_table():
    with pytest.raises(ValueError, match="alphas_cumprod"):
        dg.DiscreteVPScheduler(torch.tensor([0.5, 0.9]))
    with pytest.raises(ValueError, match="alphas_cumprod"):
        dg.DiscreteVPScheduler(torch.tensor([1.5, 0.9]))


def test_unknown_scheduler_suggests():
    with pytest.raises(ValueError, match="Did you mean 'linear'"):
        dg.make_scheduler("linaer")


@pytest.mark.parametrize("name", SCHEDULERS, ids=list(SCHEDULERS))
def test_memoryless_sigma_formula(name):
    sched = SCHEDULERS[name]
    t = torch.linspace(0.1, 0.9, 9, dtype=torch.float64)
    a, b, da, db = sched(t)
    expected = torch.sqrt(2 * b * (da * b / a - db))
    torch.testing.assert_close(make_noise("memoryless")(t, sched), expected)
    torch.testing.assert_close(dg.Memoryless(0.5)(t, sched), 0.5 * expected)
    assert torch.all(make_noise("ode")(t, sched) == 0)
    torch.testing.assert_close(make_noise(0.3)(t, sched), torch.full_like(t, 0.3))
    torch.testing.assert_close(make_noise(lambda s: s**2)(t, sched), t**2)


def test_linear_memoryless_is_known_closed_form():
    t = torch.tensor([0.25, 0.5], dtype=torch.float64)
    # linear: eta = (1 - t) / t
    torch.testing.assert_close(dg.LinearScheduler().eta(t), (1 - t) / t)


def test_noise_errors():
    with pytest.raises(ValueError, match="noise"):
        make_noise("memoryles")
    with pytest.raises(ValueError, match="value"):
        dg.Constant(-1.0)
    with pytest.raises(TypeError, match="noise"):
        make_noise([1, 2])


def test_time_grid():
    g = make_time_grid(10, t_start=0.01)
    assert g.shape == (11,) and g.dtype == torch.float64
    assert math.isclose(float(g[0]), 0.01) and float(g[-1]) == 1.0
    torch.testing.assert_close(make_time_grid(grid=[0.1, 0.5, 1.0]), torch.tensor([0.1, 0.5, 1.0], dtype=torch.float64))
    for bad in (0, -3, 2.5, None):
        with pytest.raises(ValueError, match="steps"):
            make_time_grid(bad)
    with pytest.raises(ValueError, match="increasing"):
        make_time_grid(grid=[0.5, 0.2, 1.0])
    with pytest.raises(ValueError, match="t_start"):
        make_time_grid(10, t_start=1.0)
