"""Global statistics of a batch spread over processes, and gradient averaging.

Two rules make a data-parallel run reproduce the one-process run of the combined batch:

- **per-sample scalars are gathered** (:func:`gather_cat`, in rank order = shard order) and a
  statistic (group baselines, a softmax over the batch, a standard deviation, an effective sample
  size, a metric) is computed on the full vector with the one-process expression;
- **gradients are averaged** (:func:`average_gradients`); a loss that is a mean over a rank's
  samples is scaled by :func:`global_mean_loss` so that the average over ranks of the local
  gradients is the gradient of the mean over *all* samples, also when ranks hold different
  numbers of them (e.g. after dropping invalid samples).

Every function is the identity (or the plain local expression) without a process group.
Collectives: every rank must call them, in the same order.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import Tensor

from diffusiongym.distributed.group import is_distributed, world_size

__all__ = [
    "all_sum",
    "all_mean",
    "any_rank",
    "gather_cat",
    "gather_offset",
    "local_part",
    "global_mean_loss",
    "average_gradients",
    "broadcast_object",
]


def _active() -> bool:
    return is_distributed() and world_size() > 1


def all_sum(x: Tensor) -> Tensor:
    """Sum of ``x`` over ranks (a new tensor; ``x`` itself without a group). Not differentiable."""
    if not _active():
        return x
    out = x.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def all_mean(x: Tensor | float) -> Tensor:
    """Mean of ``x`` (a tensor or a float, same shape on every rank) over ranks."""
    if not _active():
        return x if isinstance(x, Tensor) else torch.tensor(float(x), dtype=torch.float64)
    t = x.detach().clone() if isinstance(x, Tensor) else torch.tensor(float(x), dtype=torch.float64)
    if t.is_floating_point():
        t = t.to(_comm_device(t))
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return (t / world_size()).to(x.device if isinstance(x, Tensor) else "cpu")
    raise TypeError(f"x: expected a floating tensor or a float, got {t.dtype}")


def any_rank(flag: bool) -> bool:
    """Whether ``flag`` holds on at least one rank (e.g. a callback asked to stop)."""
    if not _active():
        return bool(flag)
    t = torch.tensor([1.0 if flag else 0.0], device=_comm_device(None))
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def _comm_device(x: Tensor | None) -> torch.device:
    """nccl needs CUDA tensors; gloo takes CPU ones."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def gather_cat(x: Tensor, dim: int = 0) -> Tensor:
    """``x`` of every rank concatenated along ``dim`` in rank order (sizes along ``dim`` may
    differ; other dimensions must agree). Without a group: ``x``. Not differentiable."""
    if not _active():
        return x
    dev = _comm_device(x)
    y = x.detach().movedim(dim, 0).contiguous()
    dtype = y.dtype
    if dtype == torch.bool:  # not every backend reduces bools
        y = y.to(torch.uint8)
    y = y.to(dev)
    sizes = torch.tensor([y.shape[0]], device=dev, dtype=torch.int64)
    all_sizes = [torch.zeros_like(sizes) for _ in range(world_size())]
    dist.all_gather(all_sizes, sizes)
    counts = [int(s.item()) for s in all_sizes]
    top = max(counts)
    padded = torch.zeros((top, *y.shape[1:]), dtype=y.dtype, device=dev)
    padded[: y.shape[0]] = y
    parts = [torch.zeros_like(padded) for _ in counts]
    dist.all_gather(parts, padded)
    out = torch.cat([p[:c] for p, c in zip(parts, counts)]).to(x.device)
    return out.to(dtype).movedim(0, dim)


def gather_offset(n: int) -> tuple[int, int]:
    """``(offset, total)``: where this rank's ``n`` rows start in :func:`gather_cat`'s result."""
    if not _active():
        return 0, n
    counts = gather_cat(torch.tensor([n], dtype=torch.int64)).tolist()
    from_rank = sum(counts[: dist.get_rank()])
    return int(from_rank), int(sum(counts))


def local_part(full: Tensor, n: int, dim: int = 0) -> Tensor:
    """This rank's ``n`` rows of a tensor laid out as :func:`gather_cat` lays them (needs the
    same ``n`` as was gathered: one collective to find the offset)."""
    start, total = gather_offset(n)
    if full.shape[dim] != total:
        raise ValueError(
            f"full: expected {total} rows along dim {dim} (the ranks' rows together), got {full.shape[dim]}"
        )
    return full.narrow(dim, start, n)


def global_mean_loss(values: Tensor) -> Tensor:
    """A differentiable stand-in for the mean of ``values`` over *all* ranks' elements.

    Returns ``values.sum() * W / N`` (``N`` the global count): averaging its gradient over the
    ``W`` ranks (:func:`average_gradients`) gives the gradient of the global mean, and
    :func:`all_mean` of its value is the global mean. Without a group: ``values.mean()``.
    """
    if not _active():
        return values.mean()
    count = all_sum(torch.tensor([float(values.numel())], dtype=torch.float64, device=_comm_device(values)))
    return values.sum() * (world_size() / float(count.item()))


def average_gradients(params: Iterable[Tensor]) -> None:
    """Replace each parameter's ``.grad`` by its mean over ranks (one flat all-reduce).

    A parameter without a gradient on this rank contributes zeros; it gets the mean if some rank
    has a gradient and stays ``None`` if none has. No-op without a group.
    """
    if not _active():
        return
    params = [p for p in params]
    if not params:
        return
    dev = _comm_device(params[0])
    has = torch.tensor([0.0 if p.grad is None else 1.0 for p in params], device=dev)
    dist.all_reduce(has, op=dist.ReduceOp.MAX)
    live = [p for p, h in zip(params, has.tolist()) if h > 0]
    if not live:
        return
    dtype = live[0].dtype
    flat = torch.cat(
        [
            (p.grad if p.grad is not None else torch.zeros_like(p)).detach().reshape(-1).to(dev, torch.float64)
            for p in live
        ]
    )
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= world_size()
    start = 0
    for p in live:
        n = p.numel()
        g = flat[start : start + n].reshape(p.shape).to(p.device, p.dtype if p.is_floating_point() else dtype)
        start += n
        if p.grad is None:
            p.grad = g
        else:
            p.grad.copy_(g)


def broadcast_object(obj: object, src: int = 0) -> object:
    """``obj`` of rank ``src`` on every rank (pickled; small objects only)."""
    if not _active():
        return obj
    box: list[object] = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
