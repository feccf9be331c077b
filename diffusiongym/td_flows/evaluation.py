"""Policy evaluation and generalised policy improvement (GPI) with successor-measure flows.

With ``m^pi(. | s, a) = (1 - gamma) sum_k gamma^k P(S_{k+1} in . | s, a, pi)``:

- a reward of the *next state*, ``R_k = r(S_{k+1})``, has
  ``Q(s, a) = sum_k gamma^k E r(S_{k+1}) = (1 - gamma)^-1 E_{X ~ m(.|s,a)} r(X)``;
- a reward of the *current state and action* (Gymnasium's usual ``r(s_k, a_k)``, e.g.
  Pendulum's cost of the angle before the step) has ``R_0 = r(s, a)`` known and
  ``R_{k+1} = r(S_{k+1}, pi(S_{k+1}))``, so
  ``Q(s, a) = r(s, a) + gamma (1 - gamma)^-1 E_{X ~ m(.|s,a)} r(X, pi(X))``.

:func:`q_value` does the first, or the second when given ``pi``. Either way the expectation is a
Monte-Carlo average over ``num_samples`` ODE draws of the model, and any reward works without
retraining. GPI over policies ``pi_1..pi_n`` with models ``m_1..m_n`` acts with
``argmax_{a in C(s)} max_i Q_i(s, a)`` over a finite candidate set ``C(s)`` (the policies' own
actions ``pi_j(s)``, plus optional extra candidates): :class:`GPIPolicy`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from diffusiongym.td_flows.successor import SuccessorFlow
from diffusiongym.utils.validation import check_positive_int

__all__ = ["q_value", "GPIPolicy"]

Policy = Callable[[Tensor], Tensor]


@torch.no_grad()
def q_value(
    model: SuccessorFlow,
    s: Tensor,
    a: Tensor,
    reward: Callable[..., Tensor],
    *,
    pi: Policy | None = None,
    num_samples: int = 64,
    steps: int = 16,
    generator: torch.Generator | None = None,
) -> Tensor:
    """``Q(s, a)`` of the policy whose successor measure ``model`` holds (discount ``model.gamma``).

    Parameters
    ----------
    model : SuccessorFlow
    s : Tensor, (n, ds)
    a : Tensor, (n, da)
    reward : callable
        Without ``pi``: ``reward(x) -> (m,)`` of a (next) state. With ``pi``: ``reward(x, a) -> (m,)``
        of a state and the action taken in it.
    pi : callable, optional
        The evaluated policy, ``pi(x) -> (m, da)``; switches to the state-action formula.
    num_samples, steps
        Model draws per ``(s, a)`` and Euler steps of its ODE.

    Returns
    -------
    Tensor, (n,), in ``s``'s dtype.
    """
    gamma = model.gamma
    if gamma >= 1.0:
        raise ValueError("model: gamma = 1 has no finite Q; use a discounted model")
    k = check_positive_int("num_samples", num_samples)
    x = model.sample(s, a, k, steps=steps, generator=generator)  # (n, k, ds)
    flat = x.reshape(-1, x.shape[-1])
    if pi is None:
        return reward(flat).reshape(s.shape[0], k).mean(1) / (1 - gamma)
    future = reward(flat, pi(flat)).reshape(s.shape[0], k).mean(1)
    return reward(s, a).reshape(-1) + gamma / (1 - gamma) * future


class GPIPolicy:
    """Generalised policy improvement: ``a(s) = argmax_{c in C(s)} max_i Q_i(s, c)``.

    Parameters
    ----------
    models : sequence of SuccessorFlow
        ``m_i``, the successor measure of ``policies[i]`` (same discount).
    policies : sequence of callables
        ``pi_i(s) -> (n, da)``; their actions at ``s`` are the candidates.
    reward : callable
        As in :func:`q_value` (state-action form when ``state_action=True``).
    state_action : bool
        ``reward(x, a)`` of a state and action (each ``Q_i`` then uses ``pi_i`` for the future
        actions); otherwise ``reward(x)`` of the next state.
    extra_candidates : callable, optional
        ``extra(s) -> (n, c, da)`` more candidate actions per state.
    num_samples, steps, generator
        As in :func:`q_value`.

    Calling ``gpi(s)`` returns the actions ``(n, da)``; :meth:`q_matrix` the values
    ``(n, policies, candidates)`` behind them.
    """

    def __init__(
        self,
        models: Sequence[SuccessorFlow],
        policies: Sequence[Policy],
        reward: Callable[..., Tensor],
        *,
        state_action: bool = False,
        extra_candidates: Callable[[Tensor], Tensor] | None = None,
        num_samples: int = 32,
        steps: int = 10,
        generator: torch.Generator | None = None,
    ):
        if len(models) != len(policies) or len(models) == 0:
            raise ValueError(
                f"models, policies: expected one model per policy (at least one), got {len(models)} and {len(policies)}"
            )
        for i, m in enumerate(models):
            if not isinstance(m, SuccessorFlow):
                raise TypeError(f"models[{i}]: expected a SuccessorFlow, got {type(m).__name__}")
        self.models, self.policies, self.reward = list(models), list(policies), reward
        self.state_action, self.extra_candidates = bool(state_action), extra_candidates
        self.num_samples, self.steps, self.generator = check_positive_int("num_samples", num_samples), steps, generator

    def candidates(self, s: Tensor) -> Tensor:
        """Candidate actions ``(n, c, da)``: ``pi_j(s)`` for every policy, then the extra ones."""
        cands = [pi(s)[:, None] for pi in self.policies]
        if self.extra_candidates is not None:
            cands.append(self.extra_candidates(s))
        return torch.cat(cands, dim=1)

    @torch.no_grad()
    def q_matrix(self, s: Tensor, cands: Tensor | None = None) -> Tensor:
        """``Q_i(s, c_j)``, shape ``(n, policies, candidates)``."""
        cands = self.candidates(s) if cands is None else cands
        n, c, da = cands.shape
        s_rep = s.repeat_interleave(c, 0)
        flat = cands.reshape(n * c, da)
        rows = []
        for model, pi in zip(self.models, self.policies):
            q = q_value(
                model,
                s_rep,
                flat,
                self.reward,
                pi=pi if self.state_action else None,
                num_samples=self.num_samples,
                steps=self.steps,
                generator=self.generator,
            )
            rows.append(q.reshape(n, c))
        return torch.stack(rows, dim=1)

    @torch.no_grad()
    def __call__(self, s: Tensor) -> Tensor:
        cands = self.candidates(s)
        best = self.q_matrix(s, cands).amax(dim=1).argmax(dim=1)  # max over policies, argmax over candidates
        return cands[torch.arange(s.shape[0], device=s.device), best]
