"""A Gymnasium vector-env wrapper that runs twisted SMC on the batch: it *resamples the batch's states*.

:class:`ResamplingVectorEnv` wraps a :class:`~diffusiongym.envs.vector_env.DiffusionVectorEnv`
(``action_mode="control"``, ``sigma > 0``). The ``num_envs`` sub-envs are the particles. After
each step it multiplies each particle's weight by the exact incremental SMC weight of the step
the agent just took (``docs/guidance.md``; the action is the proposal's control ``u``)::

    w = psi_{k+1}(x') / psi_k(x) * exp(-sqrt(h) u.z - h |u|^2 / 2),

with ``z`` recovered from the transition, ``z = (x' - x - h (b + sigma u)) / (sqrt(h) sigma)``
(``b`` from the base output the env computes for the step anyway), and ``psi_m = exp(lambda r)``
on the last step. When the ESS falls below ``ess_threshold * num_envs`` (and the episode has not
ended) the wrapper **overwrites the states** (and the per-env conditioning, e.g. labels) of the
batch: sub-env ``i`` continues from old sub-env ``ancestors[i]``.

What this does to the Gymnasium bookkeeping (read before combining with other wrappers):

- ``reward``, ``terminated``, ``truncated`` of a step belong to the states *before*
  resampling (row ``i`` is the particle that moved); the returned observation is *after*
  resampling. A per-env return summed over an episode (e.g. ``RecordEpisodeStatistics``) is
  therefore not the return of one path, and ``lambda r - KL`` is not the objective of the
  resampled law.
- ``info`` gains, every step, with Gymnasium's ``"_key"`` masks (all ``True``):
  ``"ancestors"`` (``(n,)`` long; ``arange(n)`` when nothing was resampled), ``"resampled"``
  (``(n,)`` bool, the same for all), ``"ess"`` (``(n,)``, the ESS after the weighting, the same
  for all) and ``"log_weight"`` (``(n,)``, the normalised log weights of the returned states).
  On the terminating step nothing is resampled: ``"log_weight"`` weights ``info["final_x"]``
  towards ``p*`` and ``"log_normalizer"`` (``(n,)``, the same for all) estimates
  ``log E_base[exp(lambda r)]``. The autoreset step that follows starts fresh weights.
- A twist that calls the base model (``PredFinalTwist``) costs one extra model evaluation per
  env and step here (the env does not share its base output with the twist).
"""

from __future__ import annotations

import math
from typing import Any

import gymnasium as gym
import torch
from torch import Tensor

from diffusiongym.envs.vector_env import DiffusionVectorEnv
from diffusiongym.guidance.resampling import RESAMPLING_SCHEMES, effective_sample_size, resample_indices
from diffusiongym.guidance.smc import reindex_cond
from diffusiongym.guidance.twists import Twist
from diffusiongym.utils.validation import check_real, unknown_name_error

__all__ = ["ResamplingVectorEnv"]


class ResamplingVectorEnv(gym.vector.VectorWrapper):
    """Twisted-SMC resampling of a torch diffusion vector env between steps (see the module docstring).

    Parameters
    ----------
    env : DiffusionVectorEnv
        ``action_mode="control"`` and a stochastic noise.
    twist : Twist
        ``psi_k`` at the intermediate grid points (the task's ``exp(lambda r)`` is used at the end).
    ess_threshold : float in [0, 1]
        Resample when the ESS falls below ``ess_threshold * num_envs``.
    resampling : {"systematic", "multinomial"}
    seed : int, optional
        Seeds the wrapper's own generator (resampling draws); ``reset(seed=...)`` reseeds it.
    """

    def __init__(
        self,
        env: DiffusionVectorEnv,
        twist: Twist,
        *,
        ess_threshold: float = 0.5,
        resampling: str = "systematic",
        seed: int | None = None,
    ):
        if not isinstance(getattr(env, "unwrapped", None), DiffusionVectorEnv):
            raise TypeError(f"env: expected a DiffusionVectorEnv (torch), got {type(env).__name__}")
        if not isinstance(twist, Twist):
            raise TypeError(f"twist: expected a diffusiongym.guidance Twist, got {type(twist).__name__}")
        if not isinstance(resampling, str) or resampling not in RESAMPLING_SCHEMES:
            raise unknown_name_error("resampling", resampling, RESAMPLING_SCHEMES)
        sim = env.unwrapped.sim
        if sim.action_mode != "control":
            raise ValueError(
                f"env: expected action_mode='control' (the action is the proposal's u), got {sim.action_mode!r}"
            )
        if sim.deterministic:
            raise ValueError("env: SMC needs sigma > 0 (with noise='ode' the kernel has no density)")
        super().__init__(env)
        self.twist = twist
        self.ess_threshold = check_real("ess_threshold", ess_threshold, low=0.0, high=1.0)
        self.resampling = resampling
        self.generator = torch.Generator(device=sim.device)
        if seed is not None:
            self.generator.manual_seed(int(seed))
        else:
            self.generator.seed()
        self._log_w: Tensor | None = None
        self._log_psi: Tensor | None = None
        self._log_z = 0.0
        self._ended = False

    @property
    def sim(self):
        return self.env.unwrapped.sim

    def _start(self) -> None:
        sim = self.sim
        self._log_psi = self.twist(sim.x, sim.times[0], sim.task.environment, **sim.cond)
        self._log_w = self._log_psi.clone()
        self._log_z = 0.0
        self._ended = False

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        if seed is not None:
            self.generator.manual_seed(int(seed))
        obs, info = self.env.reset(seed=seed, options=options)
        self._start()
        return obs, info

    def step(self, actions: Any):
        if self._log_w is None:
            raise RuntimeError("step: call reset() before step()")
        if self._ended:  # the env autoresets on this step: fresh particles, fresh weights
            out = self.env.step(actions)
            self._start()
            return out
        sim = self.sim
        k, s = sim.k, sim.schedule
        x = sim.x.clone()
        out_base = sim.base_output()  # shared with the env's own step: no extra model call
        u = sim.check_action(actions) * sim.action_scale
        obs, reward, terminated, truncated, info = self.env.step(actions)
        x_new = sim.x
        h = s.h[k]
        mean = x + h * (x * s.coef_x[k] + s.coef_out[k] * out_base + s.sigma[k] * u)
        z = (x_new - mean) / s.step_sigma[k]
        dims = tuple(range(1, x.ndim))
        log_ratio = -(math.sqrt(h) * (u * z).sum(dims) + 0.5 * h * (u * u).sum(dims))
        ended = bool(terminated.any())
        if ended:
            lam = sim.task.reward_scale
            log_psi_new = torch.where(
                info["valid"],
                lam * info["reward"].to(x.dtype),
                torch.full_like(info["reward"], -math.inf, dtype=x.dtype),
            )
        else:
            log_psi_new = self.twist(x_new, sim.times[k + 1], sim.task.environment, **sim.cond)
        self._log_w = torch.nan_to_num(self._log_w + log_psi_new - self._log_psi + log_ratio, nan=-math.inf)
        self._log_psi = log_psi_new
        n = sim.num_envs
        if bool((self._log_w == -math.inf).all()):
            raise RuntimeError("step: every sub-env has zero SMC weight (the twist or the reward gave psi = 0)")
        ess = effective_sample_size(self._log_w)
        ancestors = torch.arange(n, device=sim.device)
        resampled = False
        if not ended and float(ess) < self.ess_threshold * n:
            self._log_z += float(torch.logsumexp(self._log_w.double(), 0)) - math.log(n)
            ancestors = resample_indices(self._log_w, self.resampling, generator=self.generator)
            sim.x = sim.x[ancestors]
            sim.cond = reindex_cond(sim.cond, ancestors, n)
            self._log_psi = self._log_psi[ancestors]
            self._log_w = torch.zeros_like(self._log_w)
            obs = sim.observation()
            resampled = True
        log_weight = self._log_w - torch.logsumexp(self._log_w, 0)
        true = torch.ones(n, dtype=torch.bool, device=sim.device)
        extra = {
            "ancestors": ancestors,
            "resampled": torch.full((n,), resampled, dtype=torch.bool, device=sim.device),
            "ess": ess.expand(n).clone(),
            "log_weight": log_weight,
        }
        if ended:
            log_z = self._log_z + float(torch.logsumexp(self._log_w.double(), 0)) - math.log(n)
            extra["log_normalizer"] = torch.full((n,), log_z, dtype=torch.float64, device=sim.device)
            self._ended = True
        info = {**info, **extra, **{f"_{key}": true.clone() for key in extra}}
        return obs, reward, terminated, truncated, info
