"""The compiled fast path of the Euler–Maruyama loop (opt-in: ``compile=True``).

Used by :func:`diffusiongym.sample` (``compile=True``), the torch vector env
(``gym.make_vec(..., compile=True)``, :class:`~diffusiongym.envs.simulator.DiffusionSimulator`) and
the trainers' rollouts (``TrainerConfig.compile``).

What is compiled
    One step, as one graph: the base model call at ``t_k``, the drift ``b = coef_x x + coef_out out``,
    the control of a fine-tuned ``policy`` model ``u = coef_out (out_policy - out) / sigma``, the
    running cost ``1/2 |u|^2 h`` and the update ``x + h (b + sigma u) + sqrt(h) sigma z``. It is
    compiled with ``torch.compile(fullgraph=True, dynamic=False)``: shapes are fixed, and a model that
    cannot be traced as one graph raises (never a silent fallback to eager). The step's scalars come
    from a table built once per grid (:func:`step_table`) and enter as one small tensor per step, so
    the same graph serves every step and nothing is read back to the host per step.
What stays eager
    The standard normals ``z_k``, drawn outside the graph from the same generator, in the same order
    and shapes as the eager loop: a seed gives bit-identical noise, and the states agree with the
    eager path to float32 rounding (``tests/test_compile.py`` states the tolerance). A general
    ``control(x, t, **cond)`` (e.g. :class:`~diffusiongym.policies.value.ValuePolicy`, which
    differentiates a value network) is called eagerly before each step and enters the graph as an
    input; a fine-tuned model given as ``policy=`` (or a
    :class:`~diffusiongym.policies.control.ModelControl` of the sampled environment) is fused into it.
Cost and reuse
    The first call with a new key (model, policy, batch shape, dtype, device, conditioning shapes,
    what is stored) pays the compilation: seconds to a minute on a CPU, which is why ``compile`` is
    off by default. Later calls reuse the compiled step from a per-process cache held weakly by the
    model (it goes when the model goes); in-place parameter updates (training) need no recompilation.
    Each key gets its own copy of the step's code object, so torch's per-function recompile limit is
    never shared between keys.
CUDA
    On CUDA devices the step uses ``mode="reduce-overhead"`` (CUDA graphs: one graph launch per
    step); every output that is kept is copied out of the graph's memory pool before the next step,
    because a replay overwrites it. Elsewhere the default mode (inductor's fused C++ kernels).
Platforms
    ``torch.compile`` needs a working C++ compiler on the CPU (Triton on CUDA); where compilation
    fails, :class:`CompileError` says so and names ``compile=False`` as the way out.

Rows of :func:`step_table`: ``t, h, sigma, sqrt(h) sigma, coef_x, coef_out, coef_out / sigma
(0 where sigma = 0), h / 2``; ``t = 0`` is noise and ``t = 1`` data.
"""

from __future__ import annotations

import types
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

__all__ = ["CompileError", "compile_mode", "step_table", "engine_step", "simulator_steps", "clear_cache"]

# columns of a step_table row
T, H, SIGMA, STEP_SIGMA, COEF_X, COEF_OUT, FACTOR, HALF_H = range(8)


class CompileError(RuntimeError):
    """``torch.compile`` could not build the fast path (untraceable model, no compiler)."""


def compile_mode(device: torch.device) -> str:
    """The ``torch.compile`` mode for ``device``: ``"reduce-overhead"`` (CUDA graphs) on CUDA, else ``"default"``."""
    return "reduce-overhead" if torch.device(device).type == "cuda" else "default"


def step_table(schedule: Any, dtype: torch.dtype, device: torch.device) -> list[Tensor]:
    """One row per step of ``schedule`` (a :class:`~diffusiongym.sampling.StepSchedule`): a tensor
    ``(8,)`` with the columns listed in the module docstring.

    Built in float64, then cast to ``dtype`` (float32 for half precisions: the eager loop's Python
    scalars enter its kernels in float32 too). Each row is its own contiguous tensor.
    """
    cols = torch.tensor(
        [schedule.t, schedule.h, schedule.sigma, schedule.step_sigma, schedule.coef_x, schedule.coef_out],
        dtype=torch.float64,
    )
    sigma, coef_out = cols[SIGMA], cols[COEF_OUT]
    factor = torch.where(sigma > 0, coef_out / torch.where(sigma > 0, sigma, 1.0), 0.0)
    table = torch.cat([cols, factor[None], 0.5 * cols[H][None]]).T
    row_dtype = dtype if dtype in (torch.float32, torch.float64) else torch.float32
    table = table.to(dtype=row_dtype, device=device)
    return [row.clone() for row in table.unbind(0)]


def time_rows(times: Tensor) -> list[Tensor]:
    """The grid's left times ``t_k`` as separate 0-d tensors (``times`` already in the sampling dtype)."""
    return [t.clone() for t in times[:-1].unbind(0)]


# ------------------------------------------------------------------------------------ the graphs
def _engine_step(
    model: Callable[..., Tensor],
    policy: Callable[..., Tensor] | None,
    x: Tensor,
    t: Tensor,
    row: Tensor,
    z: Tensor | None,
    u: Tensor | None,
    cond: dict[str, Any],
    want_drift: bool,
    want_u: bool,
) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """One Euler–Maruyama step: ``(x_next, running cost (n,) or None, base drift or None, u or None)``.

    ``u`` is an eagerly computed control (or ``None``); with ``policy`` the control is computed here.
    ``z`` is ``None`` for ``sigma = 0``. The operations mirror the eager loop in
    :func:`diffusiongym.sample`, in the same order.
    """
    t_vec = t.expand(x.shape[0])
    out = model(x, t_vec, **cond)
    drift = x * row[COEF_X] + out * row[COEF_OUT]
    base = drift if want_drift else None
    running = None
    if policy is not None:
        u = (policy(x, t_vec, **cond) - out) * row[FACTOR]
    if u is not None:
        running = (u * u).sum(dim=tuple(range(1, x.ndim))) * row[HALF_H]
        drift = drift + row[SIGMA] * u
    x = x + row[H] * drift
    if z is not None:
        x = x + row[STEP_SIGMA] * z
    return x, running, base, (u if want_u and policy is not None else None)


def _model_call(model: Callable[..., Tensor], x: Tensor, t: Tensor, cond: dict[str, Any]) -> Tensor:
    """The base model's output at ``(x, t_k)``."""
    return model(x, t.expand(x.shape[0]), **cond)


def _simulator_update(
    x: Tensor, out_base: Tensor, a: Tensor, z: Tensor | None, row: Tensor, scale: Tensor, action_mode: str
) -> tuple[Tensor, Tensor]:
    """The simulator's step for an action (see :mod:`diffusiongym.envs.simulator`):
    ``(x_next, step reward -1/2 |u|^2 h (zeros for sigma = 0))``; ``z`` is ``None`` for ``sigma = 0``."""
    u: Tensor | None
    if action_mode == "control":
        u = a * scale
        drift = x * row[COEF_X] + out_base * row[COEF_OUT] + u * row[SIGMA]
    elif action_mode == "drift":
        drift = a * scale
        u = None if z is None else (drift - (x * row[COEF_X] + out_base * row[COEF_OUT])) / row[SIGMA]
    else:
        out = a * scale
        drift = x * row[COEF_X] + out * row[COEF_OUT]
        u = None if z is None else (out - out_base) * row[FACTOR]
    if u is None:
        reward = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    else:
        reward = (u * u).sum(dim=tuple(range(1, x.ndim))) * -row[HALF_H]
    x_next = x + row[H] * drift
    if z is not None:
        x_next = x_next + row[STEP_SIGMA] * z
    return x_next, reward


# ------------------------------------------------------------------------------------ the cache
# model -> {key: compiled function}; entries go when the model is garbage-collected
_CACHE: weakref.WeakKeyDictionary[Any, dict[tuple, Callable[..., Any]]] = weakref.WeakKeyDictionary()
# models that cannot be weakly referenced are held here, by id
_STRONG_CACHE: dict[int, tuple[Any, dict[tuple, Callable[..., Any]]]] = {}


def clear_cache() -> None:
    """Drop every compiled step (the next ``compile=True`` call compiles again)."""
    _CACHE.clear()
    _STRONG_CACHE.clear()


def _entries(model: Any) -> dict[tuple, Callable[..., Any]]:
    """The compiled functions of ``model`` (a bound method's are its instance's: the method object
    itself is rebuilt at every attribute access)."""
    if isinstance(model, types.MethodType):
        return _entries(model.__self__).setdefault(("method", model.__func__), {})
    try:
        return _CACHE.setdefault(model, {})
    except TypeError:
        held = _STRONG_CACHE.setdefault(id(model), (model, {}))
        return held[1]


def _fresh(fn: Callable[..., Any]) -> Callable[..., Any]:
    """A copy of ``fn`` with its own code object: dynamo's compiled-code cache and recompile limit
    live on the code object, so each cache key compiles and guards independently."""
    return types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)


def _signature(value: Any) -> Any:
    if isinstance(value, Tensor):
        return ("tensor", tuple(value.shape), value.dtype, value.device)
    return (type(value).__name__,)


def _compiled(model: Any, key: tuple, template: Callable[..., Any], device: torch.device) -> Callable[..., Any]:
    entries = _entries(model)
    fn = entries.get(key)
    if fn is None:
        fn = torch.compile(_fresh(template), fullgraph=True, dynamic=False, mode=compile_mode(device))
        entries[key] = fn
    return fn


def _call(fn: Callable[..., Any], what: str, *args: Any) -> Any:
    """Call a compiled function; turn torch's compilation failures into a :class:`CompileError`."""
    exc = torch._dynamo.exc
    try:
        return fn(*args)
    except exc.BackendCompilerFailed as err:
        inner = err.inner_exception
        raise CompileError(
            f"compile: torch.compile's inductor backend failed for {what} ({type(inner).__name__}: "
            f"{_first_line(inner)}). It needs a working C++ compiler on the CPU (Triton on CUDA); "
            "use compile=False on this platform."
        ) from err
    except (exc.Unsupported, exc.UserError) as err:
        raise CompileError(
            f"compile: {what} cannot be traced as one graph by torch.compile (fullgraph=True): "
            f"{_first_line(err)}. Make it traceable (no Python control flow on tensor values, "
            "no autograd.grad) or use compile=False."
        ) from err
    except exc.FailOnRecompileLimitHit as err:
        raise CompileError(
            f"compile: {what} was recompiled too often (its non-tensor inputs or attributes keep "
            f"changing): {_first_line(err)}. Use compile=False."
        ) from err
    except exc.TorchDynamoException as err:
        raise CompileError(f"compile: torch.compile failed for {what}: {_first_line(err)}") from err


def _first_line(err: BaseException | None) -> str:
    lines = str(err).strip().splitlines() if err is not None else []
    return lines[0] if lines else ""


def _cudagraphs(device: torch.device) -> bool:
    return compile_mode(device) == "reduce-overhead"


def _check_output(name: str, out: Any, x: Tensor, hint: str = "same as x") -> None:
    if not isinstance(out, Tensor) or out.shape != x.shape:
        got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(f"{name} output: expected shape {tuple(x.shape)} ({hint}), got {got}")


# --------------------------------------------------------------------------------- the engine
def engine_step(
    model: Callable[..., Tensor],
    policy: Callable[..., Tensor] | None,
    x: Tensor,
    t0: Tensor,
    cond: dict[str, Any],
    *,
    has_control: bool,
    deterministic: bool,
    want_drift: bool,
    want_u: bool,
) -> Callable[[Tensor, Tensor, Tensor, Tensor | None, Tensor | None], tuple]:
    """The compiled step for :func:`diffusiongym.sample`, bound to ``model``, ``policy`` and ``cond``:
    ``step(x, t_k, row_k, z_k, u_k) -> (x_next, running_k, base drift_k, u_k)`` (``None`` where not
    asked for; see :func:`_engine_step`).

    A new key is validated first with one eager model (and policy) call at ``(x, t0)``, so a wrong
    output shape raises the engine's ``ValueError`` rather than a compiler error.
    """
    key = (
        "engine",
        _ref_key(policy),
        has_control,
        tuple(x.shape),
        x.dtype,
        x.device,
        tuple(sorted((k, _signature(v)) for k, v in cond.items())),
        deterministic,
        want_drift,
        want_u,
    )
    entries = _entries(model)
    if key not in entries:
        with torch.no_grad():
            t_vec = t0.expand(x.shape[0])
            out = model(x, t_vec, **cond)
            _check_output("model", out, x)
            if policy is not None:
                _check_output("policy", policy(x, t_vec, **cond), x, "same as x, the base model's output")
    fn = _compiled(model, key, _engine_step, x.device)
    copy_out = _cudagraphs(x.device)
    what = "the model" if policy is None else "the model or the policy"

    def step(x: Tensor, t: Tensor, row: Tensor, z: Tensor | None, u: Tensor | None) -> tuple:
        result = _call(fn, what, model, policy, x, t, row, z, u, cond, want_drift, want_u)
        if copy_out:  # a CUDA-graph replay overwrites its outputs: keep copies
            return tuple(None if r is None else r.clone() for r in result)
        return result

    return step


def _ref_key(obj: Any) -> Any:
    """A key part for an object the graph calls (a policy): its identity, held weakly where possible."""
    if obj is None:
        return None
    try:
        ref = weakref.ref(obj)
    except TypeError:
        return ("id", id(obj))
    return _IdentityRef(ref, id(obj))


class _IdentityRef:
    """A weak reference compared by the identity of a live referent (a dead one equals nothing)."""

    __slots__ = ("ref", "ident")

    def __init__(self, ref: weakref.ref, ident: int):
        self.ref, self.ident = ref, ident

    def __hash__(self) -> int:
        return self.ident

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _IdentityRef) and self.ref() is not None and self.ref() is other.ref()


def engine_rollout(
    model: Callable[..., Tensor],
    policy: Callable[..., Tensor] | None,
    control: Callable[..., Tensor] | None,
    x: Tensor,
    schedule: Any,
    times: Tensor,
    cond: dict[str, Any],
    generator: torch.Generator | None,
    noises: Tensor | None,
    storage: dict[str, list[Tensor]],
    running: Tensor | None,
    progress: Callable[[range], Any],
) -> Tensor:
    """The loop of :func:`diffusiongym.sample` with compiled steps; returns ``x`` at ``t_m``.

    Fills ``storage`` (lists named as ``sample``'s ``store``) and ``running`` ``(m, n)`` in place, as
    the eager loop does. ``progress`` wraps the step range (a tqdm bar or the identity).
    """
    n = x.shape[0]
    rows = step_table(schedule, x.dtype, x.device)
    t_rows = time_rows(times)
    step = engine_step(
        model,
        policy,
        x,
        t_rows[0],
        cond,
        has_control=policy is not None or control is not None,
        deterministic=schedule.deterministic,
        want_drift="drifts" in storage,
        want_u="controls" in storage,
    )
    for k in progress(range(len(rows))):
        u = None
        if control is not None:
            u = control(x, times[k].expand(n), **cond)
            _check_output("control", u, x)
        if schedule.deterministic:
            z = None
        else:
            z = (
                noises[k]
                if noises is not None
                else torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            )
        x, cost, drift, u_out = step(x, t_rows[k], rows[k], z, u)
        if running is not None and cost is not None:
            running[k] = cost
        if "drifts" in storage:
            storage["drifts"].append(drift)
        if "controls" in storage:
            kept = u_out if u_out is not None else u
            storage["controls"].append(kept.detach().clone() if kept is not None else torch.zeros_like(x))
        if "noises" in storage:
            storage["noises"].append(z.clone() if z is not None else torch.zeros_like(x))
        if "states" in storage:
            storage["states"].append(x)
    return x


# ------------------------------------------------------------------------------ the simulator
def simulator_steps(
    model: Callable[..., Tensor], x: Tensor, cond: dict[str, Any], action_mode: str, deterministic: bool
) -> tuple[Callable[..., Tensor], Callable[..., tuple[Tensor, Tensor]]]:
    """The vector env's two compiled graphs for a batch like ``x`` and conditioning like ``cond``:
    ``base(x, t_k, cond) -> out`` (the base model's output, shared with agents through
    ``base_output()``) and
    ``update(x, out_base, a, z_k, row_k, scale) -> (x_next, step reward)`` for ``action_mode``."""
    cond_sig = tuple(sorted((k, _signature(v)) for k, v in cond.items()))
    shape_key = (tuple(x.shape), x.dtype, x.device, cond_sig)
    base_fn = _compiled(model, ("sim-model", *shape_key), _model_call, x.device)
    update_fn = _compiled(model, ("sim-update", action_mode, deterministic, *shape_key), _simulator_update, x.device)
    copy_out = _cudagraphs(x.device)

    def base(x: Tensor, t: Tensor, cond: dict[str, Any]) -> Tensor:
        out = _call(base_fn, "the model", model, x, t, cond)
        return out.clone() if copy_out else out

    def update(x: Tensor, out_base: Tensor, a: Tensor, z: Tensor | None, row: Tensor, scale: Tensor) -> tuple:
        result = _call(update_fn, "the step", x, out_base, a, z, row, scale, action_mode)
        return tuple(r.clone() for r in result) if copy_out else result

    return base, update
