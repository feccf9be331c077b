import itertools

import pytest
import torch

import diffusiongym as dg
from diffusiongym.parameterization import PARAMETERIZATIONS, conversion_coefficients, convert

SCHEDULERS = {
    "linear": dg.LinearScheduler(),
    "cosine": dg.CosineScheduler(),
    "vp": dg.DiscreteVPScheduler.linear_ddpm(),
}
PAIRS = list(itertools.product(PARAMETERIZATIONS, PARAMETERIZATIONS))


@pytest.mark.parametrize("sched_name", SCHEDULERS)
@pytest.mark.parametrize("source,target", PAIRS, ids=[f"{a}->{b}" for a, b in PAIRS])
def test_round_trip_float64(sched_name, source, target):
    sched = SCHEDULERS[sched_name]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 3, dtype=torch.float64, generator=gen)
    out = torch.randn(64, 3, dtype=torch.float64, generator=gen)
    t = torch.rand(64, dtype=torch.float64, generator=gen) * 0.9 + 0.05
    there = convert(out, x, t, sched, source, target)
    back = convert(there, x, t, sched, target, source)
    torch.testing.assert_close(back, out, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("sched_name", SCHEDULERS)
def test_conversions_agree_with_definitions(sched_name):
    """From (x1_hat, eps_hat) build x and each quantity by its definition, then convert."""
    sched = SCHEDULERS[sched_name]
    gen = torch.Generator().manual_seed(1)
    x1 = torch.randn(32, 2, dtype=torch.float64, generator=gen)
    eps = torch.randn(32, 2, dtype=torch.float64, generator=gen)
    t = torch.rand(32, dtype=torch.float64, generator=gen) * 0.9 + 0.05
    a, b, da, db = (v[:, None] for v in sched(t))
    x = a * x1 + b * eps
    sigma = torch.full_like(t, 0.7)
    truth = {"endpoint": x1, "epsilon": eps, "velocity": da * x1 + db * eps, "score": -eps / b}
    drift = truth["velocity"] + 0.5 * sigma[:, None] ** 2 * truth["score"]
    for source in PARAMETERIZATIONS:
        for target, value in truth.items():
            torch.testing.assert_close(convert(truth[source], x, t, sched, source, target), value, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(
            convert(truth[source], x, t, sched, source, "drift", sigma=sigma), drift, rtol=1e-9, atol=1e-9
        )


def test_memoryless_velocity_drift_is_two_v_minus_kappa_x():
    t = torch.tensor([0.2, 0.5, 0.8], dtype=torch.float64)
    sched = dg.LinearScheduler()
    sigma = dg.Memoryless()(t, sched)
    cx, cout = conversion_coefficients("velocity", "drift", *sched(t), sigma=sigma)
    torch.testing.assert_close(cout, torch.full_like(t, 2.0))
    torch.testing.assert_close(cx, -1.0 / t)


def test_unknown_parameterization():
    with pytest.raises(ValueError, match="Did you mean 'velocity'"):
        conversion_coefficients("velocty", "score", *(torch.tensor(0.5),) * 4)
