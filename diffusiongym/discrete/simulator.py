"""The batched episode state machine shared by the single and the vector discrete Gymnasium envs.

The discrete counterpart of :class:`~diffusiongym.envs.simulator.DiffusionSimulator`: ``num_envs``
chains of a :class:`~diffusiongym.discrete.tasks.DiscreteTask`, one Euler jump step per ``step``
(``docs/maths.md``, "Discrete chains"). For step ``k`` with ``h = t_{k+1} - t_k`` the control logits are
``c = action_scale * a`` (added to the log jump rates, see :mod:`diffusiongym.discrete.chain`); the
step reward is ``-h * KL rate`` and the last step (exact: every masked coordinate jumps to a posterior
draw) adds ``reward_scale * r(x1)`` (``r`` set to 0 where invalid, flagged by ``"valid"``), so the
return is the KL-regularised objective. Each chain keeps its own step index, so a subset of the
batch can be reset (the vector env's next-step autoreset) while the others step.

All randomness (uniform source tokens, jump draws) comes from the simulator's ``torch.Generator``.
"""

from __future__ import annotations

import inspect
from typing import Any

import numpy as np
import torch
from gymnasium import spaces
from torch import Tensor

from diffusiongym.discrete.chain import base_rates, controlled_step, draw_step, time_grid
from diffusiongym.discrete.tasks import DISCRETE_TASKS, DiscreteTask, make_discrete_task
from diffusiongym.envs.simulator import check_batch
from diffusiongym.utils.validation import check_device, check_positive_int, check_real, unexpected_keyword_error
from diffusiongym.utils.validation import unknown_name_error

__all__ = ["DiscreteSimulator", "resolve_discrete_task", "ENV_ARGS"]

# keyword arguments of the envs that are not the task factory's
ENV_ARGS = ("steps", "reward_scale", "action_scale")


def resolve_discrete_task(
    task: str | DiscreteTask,
    steps: Any,
    reward_scale: Any,
    action_scale: Any,
    task_kwargs: dict[str, Any],
    where: str,
    also: tuple[str, ...] = (),
) -> tuple[DiscreteTask, int, float, float]:
    """Build the task from its name (``task_kwargs`` go to its factory) and resolve the env settings.

    The env settings are checked before the task is built (a bad ``steps`` never loads a model);
    ``None`` takes the task's default. Unknown keyword names raise ``TypeError`` in Python's wording
    with close matches (``where``: the class named in it; ``also``: its own keyword names, listed).

    Returns
    -------
    (task, steps, reward_scale, action_scale)
    """
    if isinstance(task, str):
        factory = DISCRETE_TASKS.get(task.split("/")[-1])
        if factory is None:
            raise unknown_name_error("task", task, DISCRETE_TASKS)
        known = [n for n in inspect.signature(factory).parameters if n not in ENV_ARGS]
    elif isinstance(task, DiscreteTask):
        known = []
    else:
        raise TypeError(f"task: expected a discrete task name or a DiscreteTask, got {type(task).__name__}")
    for key in task_kwargs:
        if key not in known:
            raise unexpected_keyword_error(f"{where}.__init__", key, [*ENV_ARGS, *also, *known])
    steps = None if steps is None else check_positive_int("steps", steps)
    reward_scale = None if reward_scale is None else check_real("reward_scale", reward_scale)
    action_scale = None if action_scale is None else check_real("action_scale", action_scale, positive=True)
    task = make_discrete_task(task, **task_kwargs)
    steps = check_positive_int("steps", task.steps if steps is None else steps)
    reward_scale = check_real("reward_scale", task.reward_scale if reward_scale is None else reward_scale)
    action_scale = check_real(
        "action_scale", task.action_scale if action_scale is None else action_scale, positive=True
    )
    return task, steps, reward_scale, action_scale


class DiscreteSimulator:
    """Batched episodes of a :class:`~diffusiongym.discrete.tasks.DiscreteTask` (torch tensors).

    Parameters
    ----------
    task : DiscreteTask
    num_envs : int
    steps : int, optional
        Jump steps per episode on the uniform grid of [0, 1] (default: the task's).
    reward_scale, action_scale : float, optional
        Default: the task's.
    device : str or torch.device
        Where the batch (and the task's model, moved there) lives.

    Attributes
    ----------
    x : Tensor, (num_envs, D) long
        Current tokens (``None`` before the first :meth:`reset`).
    k : Tensor, (num_envs,) long
        Step index of each chain.
    times : Tensor, (steps + 1,) float64
    generator : torch.Generator
    dtype : torch.dtype
        The actions' dtype (float32), as :class:`~diffusiongym.envs.simulator.DiffusionSimulator` has it.
    """

    dtype = torch.float32
    check_actions = True  # every action is validated (finiteness included)

    def __init__(
        self,
        task: DiscreteTask,
        num_envs: int = 1,
        *,
        steps: int | None = None,
        reward_scale: float | None = None,
        action_scale: float | None = None,
        device: str | torch.device = "cpu",
    ):
        if not isinstance(task, DiscreteTask):
            raise TypeError(f"task: expected a DiscreteTask, got {type(task).__name__}")
        self.task = task
        self.num_envs = check_positive_int("num_envs", num_envs)
        self.device = check_device(device)
        self.steps = check_positive_int("steps", task.steps if steps is None else steps)
        self.reward_scale = check_real("reward_scale", task.reward_scale if reward_scale is None else reward_scale)
        self.action_scale = check_real(
            "action_scale", task.action_scale if action_scale is None else action_scale, positive=True
        )
        task.model.to(self.device)
        self.path = task.path
        self.action_shape = (self.path.length, self.path.vocab_size)
        self.times = time_grid(self.steps).to(self.device)
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(int(np.random.SeedSequence().generate_state(1)[0]))
        self.x: Tensor | None = None
        self.k = torch.zeros(self.num_envs, dtype=torch.long, device=self.device)

    # ------------------------------------------------------------------ spaces
    def single_observation_space(self) -> spaces.Dict:
        """``{"x": MultiDiscrete([num_states] * D), "t": Box(0, 1, (1,))}``."""
        path = self.path
        return spaces.Dict(
            {
                "x": spaces.MultiDiscrete(np.full(path.length, path.num_states, dtype=np.int64)),
                "t": spaces.Box(0.0, 1.0, (1,), np.float32),
            }
        )

    def single_action_space(self) -> spaces.Box:
        """``Box(-1, 1, (D, K))`` float32."""
        return spaces.Box(-1.0, 1.0, self.action_shape, np.float32)

    # ------------------------------------------------------------------- state
    def seed(self, seed: int) -> None:
        self.generator.manual_seed(int(seed))

    def reset(self, rows: Tensor | None = None, options: dict[str, Any] | None = None) -> dict[str, Tensor]:
        """Draw source tokens for the chains in the bool mask ``rows`` (n,) (default: all) and set
        their step to 0. No ``options`` are accepted (any key raises ``ValueError``)."""
        if options:
            raise unknown_name_error("options", next(iter(options)), [])
        if rows is None or self.x is None:
            self.x = self.path.sample_source(self.num_envs, generator=self.generator, device=self.device)
            self.k.zero_()
        else:
            self.x[rows] = self.path.sample_source(int(rows.sum()), generator=self.generator, device=self.device)
            self.k[rows] = 0
        return self.observation()

    def observation(self) -> dict[str, Tensor]:
        """``{"x": (n, D) long, "t": (n, 1) float32}`` (fresh tensors)."""
        assert self.x is not None
        return {"x": self.x.clone(), "t": self.times[self.k].float().reshape(-1, 1)}

    @property
    def done(self) -> Tensor:
        """``(n,)`` bool: the chains that reached ``t = 1``."""
        return self.k >= self.steps

    def check_action(self, actions: Any) -> Tensor:
        """Validate a batch of normalised actions (the vector envs' rule: a tensor or numpy array of shape
        ``(n, D, K)``, dtype exactly float32, on the env's device, finite); returns it as float64."""
        # the continuous simulator's batch check (reads dtype, device, check_actions): one rule, one wording
        return check_batch(
            "actions", actions, (self.num_envs, *self.action_shape), self.dtype, self.device, finite=self.check_actions
        ).double()

    # -------------------------------------------------------------------- step
    def step(
        self, actions: Tensor, active: Tensor | None = None
    ) -> tuple[dict[str, Tensor], Tensor, Tensor, dict[str, Tensor]]:
        """Advance the chains in the bool mask ``active`` (n,) (default: all) one jump step.

        Parameters
        ----------
        actions : Tensor, (n, D, K)
            Normalised actions, already validated (float64 from :meth:`check_action`); the rows
            outside ``active`` are ignored.

        Returns
        -------
        observation : dict
        reward : Tensor, (n,) float64
            ``-h * KL rate``, plus ``reward_scale * r(x1)`` for the chains that terminate; 0 outside ``active``.
        terminated : Tensor, (n,) bool
        info : dict
            Gymnasium's vector convention (each key ``k`` with a bool mask ``"_k"``): ``"kl"`` (n,)
            float64 masked to ``active``; where some chain terminates ``"reward"`` (``r(x1)``, 0 where
            invalid) and ``"valid"`` (n,), masked to the terminating chains (0 / False elsewhere).
        """
        if self.x is None:
            raise RuntimeError("step: call reset() before step()")
        n, dev = self.num_envs, self.device
        act = torch.ones(n, dtype=torch.bool, device=dev) if active is None else active
        if bool((self.done & act).any()):
            raise RuntimeError("step: an episode has terminated; reset it first")
        rewards = torch.zeros(n, dtype=torch.float64, device=dev)
        kl = torch.zeros(n, dtype=torch.float64, device=dev)
        done = torch.zeros(n, dtype=torch.bool, device=dev)
        info: dict[str, Tensor] = {"kl": kl, "_kl": act.clone()}
        if bool(act.any()):
            x, k = self.x[act], self.k[act]
            t, h = self.times[k], self.times[k + 1] - self.times[k]
            last = k == self.steps - 1
            with torch.no_grad():
                rates = base_rates(self.task.model, x, t, h, last)
                probs, cost = controlled_step(rates, h, x, self.path.num_states, self.action_scale * actions[act])
            u = torch.rand(x.shape, generator=self.generator, device=dev, dtype=torch.float64)
            self.x[act], self.k[act] = draw_step(probs, u), k + 1
            kl[act] = cost
            rewards[act] = -cost
            done[act] = last
            if bool(done.any()):
                with torch.no_grad():
                    r, valid = self.task.reward(self.x[done])
                r = torch.where(valid, r, torch.zeros_like(r))  # 0 where invalid, flagged by "valid"
                final_reward = torch.zeros(n, dtype=torch.float64, device=dev)
                final_valid = torch.zeros(n, dtype=torch.bool, device=dev)
                final_reward[done] = r.double()
                final_valid[done] = valid.to(device=dev, dtype=torch.bool)
                rewards[done] += self.reward_scale * r.double()
                info.update(
                    {"reward": final_reward, "_reward": done.clone(), "valid": final_valid, "_valid": done.clone()}
                )
        return self.observation(), rewards, done, info
