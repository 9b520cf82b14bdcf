"""The learner group's own collectives (beside DeepSpeed's): each keeps its tensors on the device
they were computed on, because NCCL, the GPU backend, has no CPU collectives; a host tensor in an
NCCL all-reduce fails at run time, on the first GPU job. gloo (CPU) accepts either.

``collective_backend`` is the one place that picks NCCL or gloo for a device: the learner
group's (DeepSpeed's) and the weight push's side band (``learner.weight_sync``) alike.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def collective_backend(device: str) -> str:
    """The torch.distributed backend for tensors on ``device`` ("cuda" or "cpu"): NCCL on GPU,
    gloo on CPU."""
    return "nccl" if device == "cuda" else "gloo"


def _grouped() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_ranks_finite(loss: torch.Tensor) -> bool:
    """True when ``loss`` is finite on every rank. Every rank must call it, and all take the
    same branch after it (skipping a step on one rank alone would hang the others)."""
    flag = torch.isfinite(loss.detach()).to(torch.float32).reshape(1)  # on loss's device
    if _grouped():
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item() >= 1)


def average_over_ranks(grads: list[torch.Tensor]) -> None:
    """Replace each gradient by its mean over the ranks, in one all-reduce of one flat buffer
    on the gradients' device."""
    if not _grouped():
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    torch.nn.utils.vector_to_parameters(flat, grads)
