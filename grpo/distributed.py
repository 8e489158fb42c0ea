"""Data-parallel helpers on accelerate's `Accelerator`: rank, world size, gradient and metric
averaging, barriers. In one process every helper is a no-op, so the trainer calls them freely.

    torchrun --nproc_per_node 2 -m grpo.launch --config configs/tiny-cpu.yaml --run-dir runs/dp --steps 10

`grpo.launch` creates the accelerator first (`get_accelerator()`): under torchrun that joins the
process group (gloo on CPU, NCCL on GPUs). Each rank then samples its own prompts, and after the
backward passes of a step `average_gradients` replaces every trainable parameter's gradient by
its mean over the ranks (one all-reduce per dtype and device), before gradient clipping and the
optimizer step, so every rank applies the same update and the adapters stay identical.

The model is deliberately not wrapped by `accelerator.prepare` (DistributedDataParallel): the
trainer generates with it, disables its adapter for reference log-probs and runs several
micro-batches per update, all of which want the bare peft model; one explicit all-reduce per
update is what DDP would do at the last micro-batch anyway.

Not in the paper: the paper does not discuss distribution; averaging per-rank gradients of
per-rank losses equals the gradient of the global batch's loss for the "grpo" and "dr_grpo" loss
aggregations when every rank holds the same number of sequences (for "bnpo" it weights ranks
equally rather than by their token counts). "dapo" and "cispo" are exact for any token counts:
`grpo.algorithm.policy_update` sums the step's token count over the ranks (`global_sum`) and
divides each rank's token sum by that count / world size, so the mean of the ranks' gradients is
the gradient of (all ranks' token sum) / (global token count).
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Iterable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor


@functools.cache
def get_accelerator() -> Any:
    """This process's `Accelerator`, created on the first call (`cpu=True` when no GPU is
    visible: without it accelerate would not join a CPU process group under torchrun)."""
    from accelerate import Accelerator

    return Accelerator(cpu=not torch.cuda.is_available())


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """Global rank of this process (0 without a process group)."""
    return dist.get_rank() if _initialized() else 0


def world_size() -> int:
    """Number of processes in the group (1 without a process group)."""
    return dist.get_world_size() if _initialized() else 1


def is_main() -> bool:
    """True on rank 0 (and in a single process)."""
    return rank() == 0


def barrier() -> None:
    """Wait until every rank gets here (no-op in one process)."""
    if _initialized():
        dist.barrier()


def shutdown() -> None:
    """Leave the process group, if any (at the end of a launched run)."""
    if _initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def main_first() -> Iterator[None]:
    """Run the block on rank 0 first, then on the others (e.g. to fill a cache once)."""
    if not is_main():
        barrier()
    yield
    if is_main():
        barrier()


def _collective_device() -> torch.device:
    """Where tensors for a collective must live: the current GPU for NCCL, else the CPU."""
    if _initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def average_gradients(params: Iterable[Tensor]) -> None:
    """Replace each parameter's `.grad` by its mean over the ranks, in place (no-op in one process).

    A parameter without a gradient counts as zeros (and gets a zero gradient), so every rank
    reduces the same tensors. Gradients are flattened into one buffer per (device, dtype) and
    reduced with one all-reduce each.
    """
    world = world_size()
    if world == 1:
        return
    buckets: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        buckets.setdefault((p.grad.device, p.grad.dtype), []).append(p.grad)
    for key in sorted(buckets, key=str):  # the same order on every rank
        grads = buckets[key]
        flat = torch.cat([g.reshape(-1) for g in grads])  # (sum of numels,)
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat /= world
        for g, chunk in zip(grads, flat.split([g.numel() for g in grads])):
            g.copy_(chunk.view_as(g))


def global_sum(x: float) -> float:
    """`x` summed over the ranks, the same on every rank (`x` itself without a process group).

    A collective: every rank must call it, in the same order as its other collectives."""
    if not _initialized():
        return x
    t = torch.tensor([float(x)], dtype=torch.float64, device=_collective_device())  # (1,)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return float(t.item())


def global_max(x: int | float) -> int | float:
    """The largest `x` over the ranks, the same on every rank (`x` itself without a process
    group); an int comes back an int. A collective, like `global_sum`."""
    if not _initialized():
        return x
    t = torch.tensor([float(x)], dtype=torch.float64, device=_collective_device())  # (1,)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item()) if isinstance(x, int) else float(t.item())


def gather_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """Scalar metrics of this rank -> their mean over the ranks (keys ending in `_max`: the
    maximum), identical on every rank so rank 0 can log global values. NaN means "not measured on
    this rank" (a reward with no opinion, the entropy of a step whose update ran no row): such a
    value is left out of the mean, and the result is NaN only when no rank measured it. Ints stay
    ints. Every rank must pass the same keys. In one process the metrics come back unchanged (a
    copy)."""
    if world_size() == 1:
        return dict(metrics)
    keys = sorted(metrics)
    device = _collective_device()
    values = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64, device=device)  # (K,)
    measured = ~torch.isnan(values)  # (K,)
    total = torch.where(measured, values, torch.zeros_like(values))  # (K,)
    count = measured.to(torch.float64)  # (K,)
    peak = torch.where(measured, values, torch.full_like(values, -math.inf))  # (K,)
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    dist.all_reduce(count, op=dist.ReduceOp.SUM)
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    mean = torch.where(count > 0, total / count.clamp(min=1), torch.full_like(total, math.nan)).tolist()
    top = torch.where(count > 0, peak, torch.full_like(peak, math.nan)).tolist()
    out: dict[str, float] = {}
    for i, k in enumerate(keys):
        v = top[i] if k.endswith("_max") else mean[i]
        out[k] = int(round(v)) if isinstance(metrics[k], int) and not isinstance(metrics[k], bool) else v
    return {k: out[k] for k in metrics}
