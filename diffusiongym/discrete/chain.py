"""The (controlled) CTMC of a posterior model and its coordinate-wise Euler jump sampler.

Base chain (``docs/maths.md``, "Discrete chains"). Each coordinate ``i`` in state ``a`` jumps to a data token ``b != a`` at rate
``u_i(b) = lambda(t) p(x1_i = b | x_t)``, ``lambda = d_kappa / (1 - kappa)``; with a mask source, unmasked
coordinates never move (their rates are set to zero). Euler step over ``h``: jump to ``b`` with probability
``h u_i(b)``, stay otherwise. On the last step ``lambda`` is replaced by ``1 / h`` so that each coordinate
jumps to a posterior draw with probability one: the last step is exact, whatever ``kappa``.

Control protocol. A control is ``c = control(x, t, **cond)`` of shape ``(n, D, K)``: *additive logits on the
jump rates*, ``u~_i(b) = u_i(b) exp(c_i(b))`` (the entry at the current token is ignored). Equivalently it adds
``c`` to the posterior logits without renormalising, so any positive rates are reachable; the optimal control
of the KL-regularised problem is the discrete Doob transform ``c*_i(b) = V(x) - V(x^{i <- b})``. A fine-tuned
posterior model in the base's parameterisation gives ``c = log p_model - log p_base`` (:func:`control_from_model`).
Controlled Euler step: jump to ``b`` with probability ``h u~_i(b)``; if these sum to more than one in a
coordinate they are rescaled to sum to one (no stay).

KL. The KL rate of the controlled chain w.r.t. the base chain at ``x`` is
``sum_i sum_{b != x_i} u~ log(u~ / u) - u~ + u = sum_i sum_b u_i(b) (exp(c) (c - 1) + 1)``; the running cost of
a step is this rate times ``h`` (the step's Gymnasium reward is minus it).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from diffusiongym.discrete.models import PosteriorModel, check_tokens
from diffusiongym.rewards.base import Reward
from diffusiongym.utils.validation import check_positive_int

__all__ = [
    "DiscreteTrajectory",
    "base_rates",
    "controlled_step",
    "draw_step",
    "sample_chain",
    "control_from_model",
    "time_grid",
]

Control = Callable[..., Tensor]


def time_grid(steps: int, t_start: float = 0.0, t_end: float = 1.0, dtype: torch.dtype = torch.float64) -> Tensor:
    """Uniform grid ``t_0 = t_start < ... < t_m = t_end``, shape ``(steps + 1,)``."""
    check_positive_int("steps", steps)
    if not 0.0 <= t_start < t_end <= 1.0:
        raise ValueError(f"t_start, t_end: expected 0 <= t_start < t_end <= 1, got {t_start}, {t_end}")
    return torch.linspace(t_start, t_end, steps + 1, dtype=dtype)


def base_rates(model: PosteriorModel, x: Tensor, t: Tensor, h: Tensor, last: bool | Tensor, **cond: Any) -> Tensor:
    """Base jump rates ``u_i(b)`` towards each data token, shape ``(n, D, K)``; zero at ``b = x_i``.

    ``t`` and ``h`` have shape ``(n,)``; ``last`` (bool or (n,) bool) marks the final step (rate ``1 / h``).
    """
    path = model.path
    probs = torch.softmax(model(x, t.float(), **cond).double(), dim=-1)
    h = h.double()
    last = torch.as_tensor(last, device=x.device).expand(x.shape[0])
    lam = torch.where(last, 1.0 / h, path.scheduler.jump_rate(torch.where(last, torch.zeros_like(h), t.double())))
    rates = lam.reshape(-1, 1, 1) * probs
    K = path.vocab_size
    off = 1.0 - F.one_hot(x, path.num_states)[..., :K].double()  # b != x_i
    rates = rates * off
    if path.mask_token is not None:
        rates = rates * (x == path.mask_token).double().unsqueeze(-1)
    return rates


def controlled_step(
    rates: Tensor, h: Tensor, x: Tensor, num_states: int, control: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Transition probabilities of one controlled Euler step and the step's running cost.

    Parameters
    ----------
    rates : Tensor, (n, D, K)
        Base rates from :func:`base_rates`.
    h : Tensor, (n,)
        Step sizes.
    x : Tensor, (n, D) long
        Current states.
    num_states : int
    control : Tensor, (n, D, K), optional
        Additive logits on the rates.

    Returns
    -------
    probs : Tensor, (n, D, num_states)
        ``P(x_{k+1,i} = s | x_k)`` (float64).
    cost : Tensor, (n,)
        ``h * KL rate`` (zero without control).
    """
    h = h.double().reshape(-1, 1, 1)
    if control is None:
        ctl_rates = rates
        cost = torch.zeros(rates.shape[0], dtype=torch.float64, device=rates.device)
    else:
        c = control.double()
        ec = torch.exp(c)
        ctl_rates = rates * ec
        kl_terms = torch.where(rates > 0, rates * (ec * (c - 1) + 1), torch.zeros_like(rates))
        cost = (h * kl_terms).sum(dim=(1, 2))
    jump = h * ctl_rates
    total = jump.sum(-1, keepdim=True)
    jump = jump / total.clamp(min=1.0)
    stay = (1.0 - jump.sum(-1)).clamp(min=0.0)
    n, D, K = jump.shape
    probs = torch.zeros(n, D, num_states, dtype=torch.float64, device=rates.device)
    probs[..., :K] = jump
    probs.scatter_add_(-1, x.unsqueeze(-1), stay.unsqueeze(-1))
    return probs, cost


def draw_step(probs: Tensor, uniforms: Tensor) -> Tensor:
    """Inverse-CDF draw from ``probs`` (n, D, S) with ``uniforms`` (n, D) in [0, 1): tokens (n, D) long."""
    cdf = probs.cumsum(-1)
    idx = (cdf < uniforms.unsqueeze(-1).to(cdf.dtype) * cdf[..., -1:]).sum(-1)
    return idx.clamp(max=probs.shape[-1] - 1)


def control_from_model(base: PosteriorModel, model: PosteriorModel) -> Control:
    """Control of a fine-tuned posterior model: ``c = log_softmax(model) - log_softmax(base)``, (n, D, K)."""

    def control(x: Tensor, t: Tensor, **cond: Any) -> Tensor:
        with torch.no_grad():
            return torch.log_softmax(model(x, t, **cond), -1) - torch.log_softmax(base(x, t, **cond), -1)

    return control


@dataclass
class DiscreteTrajectory:
    """Result of :func:`sample_chain`.

    Attributes
    ----------
    x1 : Tensor, (n, D) long
        Final tokens.
    times : Tensor, (m + 1,) float64
    valid : Tensor, (n,) bool
        No mask token left and the reward's own validity.
    reward : Tensor or None, (n,)
        ``r(x1)`` (unscaled).
    running_cost : Tensor, (m, n)
        ``h_k * KL rate`` per step (zeros without a control).
    states : Tensor or None, (m + 1, n, D)
    controls : Tensor or None, (m, n, D, K)
    """

    x1: Tensor
    times: Tensor
    valid: Tensor
    running_cost: Tensor
    reward: Tensor | None = None
    reward_scale: float = 1.0
    states: Tensor | None = None
    controls: Tensor | None = None
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def kl(self) -> Tensor:
        """Per-sample path KL (rate formula), shape ``(n,)``."""
        return self.running_cost.sum(0)

    @property
    def objective(self) -> Tensor:
        """Per-sample ``lambda r(x1) - KL`` (requires a reward), shape ``(n,)``."""
        if self.reward is None:
            raise ValueError("objective: sample_chain was called without a reward")
        return self.reward_scale * self.reward.double() - self.kl

    @property
    def cost_to_go(self) -> Tensor:
        """``C_k = sum_{i >= k} cost_i - lambda r(x1)``, shape ``(m + 1, n)``."""
        if self.reward is None:
            raise ValueError("cost_to_go: sample_chain was called without a reward")
        rc = torch.cat([self.running_cost, torch.zeros_like(self.running_cost[:1])])
        return rc.flip(0).cumsum(0).flip(0) - self.reward_scale * self.reward.double()


def sample_chain(
    model: PosteriorModel,
    n: int,
    steps: int = 100,
    *,
    times: Tensor | None = None,
    control: Control | None = None,
    reward: Reward | None = None,
    reward_scale: float = 1.0,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    x0: Tensor | None = None,
    store: bool = False,
    **cond: Any,
) -> DiscreteTrajectory:
    """Sample ``n`` chains with the coordinate-wise Euler jump sampler (last step exact).

    Parameters
    ----------
    model : PosteriorModel
        The base model (defines the base rates).
    n, steps : int
        Batch size and number of steps (ignored when ``times`` is given).
    times : Tensor, optional
        Custom grid ``(m + 1,)``; it must end at 1 for the last step to be exact.
    control : callable, optional
        ``control(x, t, **cond) -> (n, D, K)`` additive rate logits (see module docstring).
    reward : Reward, optional
        Evaluated on ``x1`` (long tokens).
    seed : int, optional
        Seeds a private generator (or pass ``generator``).
    x0 : Tensor, (n, D) long, optional
        Start states (default: a draw from the source).
    store : bool
        Keep the states and controls.
    """
    check_positive_int("n", n)
    path = model.path
    device = next((b.device for b in model.buffers()), None) or next(
        (p.device for p in model.parameters()), torch.device("cpu")
    )
    if generator is None:
        generator = torch.Generator(device=device)
        generator.manual_seed(int(torch.randint(2**62, ()).item()) if seed is None else seed)
    grid = time_grid(steps) if times is None else times.double()
    x = (
        path.sample_source(n, generator=generator, device=device)
        if x0 is None
        else check_tokens(x0, path.length, path.num_states, "x0").to(device)
    )
    if x.shape[0] != n:
        raise ValueError(f"x0: expected {n} rows, got {x.shape[0]}")
    states, controls, costs = [x], [], []
    m = grid.shape[0] - 1
    for k in range(m):
        t = grid[k].expand(n).to(device)
        h = (grid[k + 1] - grid[k]).expand(n).to(device)
        last = k == m - 1 and float(grid[-1]) == 1.0
        with torch.no_grad():
            rates = base_rates(model, x, t, h, last, **cond)
            c = None if control is None else control(x, t.float(), **cond)
            probs, cost = controlled_step(rates, h, x, path.num_states, c)
        x = draw_step(probs, torch.rand(x.shape, generator=generator, device=device, dtype=torch.float64))
        costs.append(cost)
        if store:
            states.append(x)
            if c is not None:
                controls.append(c.detach())
    valid = torch.ones(n, dtype=torch.bool, device=device) if path.mask_token is None else (x != path.mask_token).all(1)
    values = None
    if reward is not None:
        values, rvalid = reward(x, **cond)
        valid = valid & rvalid
    return DiscreteTrajectory(
        x1=x,
        times=grid,
        valid=valid,
        running_cost=torch.stack(costs),
        reward=values,
        reward_scale=float(reward_scale),
        states=torch.stack(states) if store else None,
        controls=torch.stack(controls) if store and controls else None,
    )
