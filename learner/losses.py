"""Per-position distillation losses and their registry.

Every loss is called as ``fn(student_logits, teacher, mask, **params)`` and returns the mean of a
per-position divergence over the positions where ``mask`` is true (a zero that still has a
gradient path when the mask is empty). ``student_logits`` is [B, T, V] in any float dtype; the
math runs in float32 (float64 stays float64). ``p`` is the teacher, ``q = softmax(student)``.

Teacher signal. ``teacher`` is either full logits [B, T, V] or a :class:`TopKSignal`. With a
top-k signal both distributions are compared on k + 1 buckets: the teacher's k top tokens and one
tail bucket for everything else. Teacher buckets are ``exp(logprobs)`` and ``exp(tail_logmass)``;
student buckets are ``q`` at the same ids and ``q_tail = 1 - sum_k q``, computed in log space as
``logsumexp(logits outside the top-k) - logsumexp(logits)``. Merging tokens into a bucket is a
deterministic map applied to both p and q, so by the data-processing inequality every
f-divergence here (the KLs, skew KLs, JSD, TV) on the buckets is a LOWER BOUND of the same
divergence over the full vocabulary; it is exact when k = V. Padded top-k slots (teacher logprob
<= -1e3, id 0) are dropped: they add no term and are not counted in the student's top-k mass.
Both tails are floored at ``TAIL_LOG_FLOOR`` so an empty tail (-inf) never yields inf or NaN.

Memory. Masked positions are processed ``chunk_size`` at a time, and each chunk's gradient with
respect to the student logits is computed in the forward pass (``_ChunkedMean``), so only one
chunk's float32 [chunk, V] intermediates (log-softmax, probabilities, mixtures) exist at a time,
plus the gradient buffer itself. ``naive=True`` (or :func:`reference_loss`) computes the same
value in one unchunked pass with ordinary autograd, for comparisons.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

import torch

from learner.constants import DEFAULT_CHUNK_SIZE, TAIL_LOG_FLOOR
from learner.loss_params import parse_loss_params
from learner.teacher_signal import TeacherSignal, TopKSignal

PAD_LOGPROB_THRESHOLD = -1e3  # a top-k slot with a teacher logprob at or below this is padding
_NEG = -1e30                  # finite "minus infinity" (an all -inf logsumexp has a NaN gradient)


# ------------------------------------------------------------------------ bucket log-probs

def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the maths runs in: float64 stays float64, everything else is float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def topk_cover(teacher: TopKSignal, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(valid [..., k], covered [..., V]): real top-k slots, and the tokens they name.

    Padded slots (teacher logprob <= PAD_LOGPROB_THRESHOLD, id 0) are sent to a dummy column
    V, so they never mark token 0 as covered.
    """
    valid = teacher.logprobs > PAD_LOGPROB_THRESHOLD
    ids = torch.where(valid, teacher.ids, vocab)
    covered = torch.zeros(*ids.shape[:-1], vocab + 1, dtype=torch.bool, device=ids.device)
    return valid, covered.scatter_(-1, ids, True)[..., :vocab]


def _log_buckets(student: torch.Tensor, teacher: Union[torch.Tensor, TopKSignal]):
    """(log p, log q, valid) over the buckets: [n, V] for full logits, [n, k+1] for top-k.

    ``valid`` is None (all buckets count) or an [n, k+1] bool mask that drops padded slots;
    at dropped slots log p and log q hold 0 so every term stays finite.
    """
    dt = compute_dtype(student)
    s = student.to(dt)
    log_z = torch.logsumexp(s, dim=-1, keepdim=True)
    if isinstance(teacher, torch.Tensor):
        return torch.log_softmax(teacher.to(dt), dim=-1), s - log_z, None
    t_lp = teacher.logprobs.to(dt)
    valid, covered = topk_cover(teacher, s.shape[-1])
    # Student mass outside the valid top-k ids.
    tail_q = torch.logsumexp(s.masked_fill(covered, _NEG), dim=-1) - log_z[:, 0]
    top_q = s.gather(1, teacher.ids) - log_z
    zero = torch.zeros((), dtype=dt, device=s.device)
    logp = torch.cat([torch.where(valid, t_lp, zero),
                      teacher.tail_logmass.to(dt).clamp(min=TAIL_LOG_FLOOR)[:, None]], dim=1)
    logq = torch.cat([torch.where(valid, top_q, zero), tail_q.clamp(min=TAIL_LOG_FLOOR)[:, None]], dim=1)
    valid = torch.cat([valid, torch.ones_like(valid[:, :1])], dim=1)
    return logp, logq, valid


def _sum_terms(terms: torch.Tensor, valid: Optional[torch.Tensor]) -> torch.Tensor:
    if valid is not None:
        terms = torch.where(valid, terms, torch.zeros((), dtype=terms.dtype, device=terms.device))
    return terms.sum(dim=-1)


def _log_mix(w: float, loga: torch.Tensor, logb: torch.Tensor) -> torch.Tensor:
    """log(w a + (1 - w) b) for 0 < w < 1."""
    return torch.logaddexp(math.log(w) + loga, math.log1p(-w) + logb)


def _kl_terms(loga: torch.Tensor, logb: torch.Tensor) -> torch.Tensor:
    """Bucket terms of KL(a||b) = sum a (log a - log b)."""
    return loga.exp() * (loga - logb)


# --------------------------------------------------------------- per-position divergences
# Each takes [n, V] student logits and the teacher as [n, V] logits or a TopKSignal of
# [n, k] / [n] pieces, and returns the [n] per-position loss.

def _per_position_forward_kl(student, teacher):
    logp, logq, valid = _log_buckets(student, teacher)
    return _sum_terms(_kl_terms(logp, logq), valid)


def _per_position_reverse_kl(student, teacher):
    logp, logq, valid = _log_buckets(student, teacher)
    return _sum_terms(_kl_terms(logq, logp), valid)


def _per_position_generalized_jsd(student, teacher, beta=0.5):
    if beta == 0.0:
        return _per_position_forward_kl(student, teacher)
    if beta == 1.0:
        return _per_position_reverse_kl(student, teacher)
    logp, logq, valid = _log_buckets(student, teacher)
    logm = _log_mix(beta, logp, logq)
    return _sum_terms(beta * _kl_terms(logp, logm) + (1.0 - beta) * _kl_terms(logq, logm), valid)


def _per_position_tv_distance(student, teacher):
    logp, logq, valid = _log_buckets(student, teacher)
    return 0.5 * _sum_terms((logp.exp() - logq.exp()).abs(), valid)


def _per_position_skew_forward_kl(student, teacher, alpha=0.1):
    if alpha == 0.0:
        return _per_position_forward_kl(student, teacher)
    logp, logq, valid = _log_buckets(student, teacher)
    return _sum_terms(_kl_terms(logp, _log_mix(alpha, logp, logq)), valid)


def _per_position_skew_reverse_kl(student, teacher, alpha=0.1):
    if alpha == 0.0:
        return _per_position_reverse_kl(student, teacher)
    logp, logq, valid = _log_buckets(student, teacher)
    return _sum_terms(_kl_terms(logq, _log_mix(1.0 - alpha, logp, logq)), valid)


def _per_position_sft(student, labels):
    """-log q(label) = logsumexp(logits) - logits[label]."""
    s = student.to(compute_dtype(student))
    return torch.logsumexp(s, dim=-1) - s.gather(1, labels[:, None])[:, 0]


# ------------------------------------------------------------------ chunked masked mean

def _select(side: Any, index: tuple) -> Any:
    """Rows of a per-position side input at ``index`` (a copy of just those rows).

    ``side`` is a [B, T, ...] tensor, a TopKSignal, None, or a tuple of these.
    """
    if isinstance(side, TopKSignal):
        return TopKSignal(side.ids[index], side.logprobs[index], side.tail_logmass[index])
    if isinstance(side, tuple):
        return tuple(_select(x, index) for x in side)
    return side if side is None else side[index]


@dataclass(frozen=True)
class _Reduction:
    """How ``_reduce`` goes over the masked positions."""

    chunk_size: int = DEFAULT_CHUNK_SIZE
    mean: bool = True    # divide the sum by the number of positions
    naive: bool = False  # one unchunked pass with ordinary autograd, for comparisons


@dataclass(frozen=True)
class _Chunks:
    """The masked positions, the chunk size, and the factor the sum is scaled by."""

    positions: tuple[torch.Tensor, ...]
    size: int
    scale: float


class _ChunkedMean(torch.autograd.Function):
    """Sum of a per-position loss and its gradient, computed one chunk of positions at a time.

    The forward pass computes each chunk's loss and, at once, the gradient of that loss with
    respect to the chunk's logits, writing it into a buffer shaped like ``student_logits``
    (zero at unmasked positions). The backward pass only scales that buffer. So the peak is
    the gradient buffer, which any loss must hand back, plus one chunk's float32 intermediates:
    no [N, V] log-softmax, probabilities or mixtures are ever alive together.
    """

    @staticmethod
    def forward(ctx, student_logits, per_position, side, chunks: _Chunks, params):
        grad = torch.zeros_like(student_logits) if student_logits.requires_grad else None
        total = torch.zeros((), dtype=compute_dtype(student_logits), device=student_logits.device)
        scale = chunks.scale
        for start in range(0, chunks.positions[0].numel(), chunks.size):
            index = tuple(p[start:start + chunks.size] for p in chunks.positions)
            x = student_logits[index].detach()
            if grad is None:
                total = total + per_position(x, _select(side, index), **params).sum()
                continue
            with torch.enable_grad():
                x.requires_grad_(True)
                part = per_position(x, _select(side, index), **params).sum()
                (g,) = torch.autograd.grad(part, x)
            grad[index] = (g * scale).to(grad.dtype)
            total = total + part.detach()
        ctx.save_for_backward(grad if grad is not None else torch.empty(0))
        return total * scale

    @staticmethod
    def backward(ctx, grad_out):
        (grad,) = ctx.saved_tensors
        # The usual call sees grad_out == 1: hand the buffer itself on, so autograd adopts it
        # as the gradient (the saved reference is released first) instead of copying it.
        if bool(grad_out == 1):
            return grad, None, None, None, None
        return grad * grad_out.to(grad.dtype), None, None, None, None


def _reduce(per_position: Callable, student_logits: torch.Tensor, side: Any, mask: torch.Tensor,
            params: dict, how: _Reduction) -> torch.Tensor:
    """Sum (or mean) of ``per_position(rows, side_rows, **params)`` over masked positions:
    chunked unless ``how.naive``.

    An empty mask gives a zero that is still attached to the graph.
    """
    positions = mask.to(torch.bool).nonzero(as_tuple=True)
    n = positions[0].numel()
    if n == 0:
        return student_logits.reshape(-1)[:0].to(compute_dtype(student_logits)).sum()
    scale = 1.0 / n if how.mean else 1.0
    if how.naive:
        return per_position(student_logits[positions], _select(side, positions), **params).sum() * scale
    chunks = _Chunks(positions, how.chunk_size, scale)
    return _ChunkedMean.apply(student_logits, per_position, side, chunks, params)


def chunked_sum(per_position: Callable, student_logits: torch.Tensor, side: Any,
                mask: torch.Tensor, chunk_size: int = DEFAULT_CHUNK_SIZE, **params) -> torch.Tensor:
    """Sum of ``per_position(rows, side_rows, **params)`` over masked positions, in chunks.

    ``per_position`` maps [n, V] logits (and the matching rows of ``side``) to [n] values; the
    gradient with respect to ``student_logits`` is built chunk by chunk (see _ChunkedMean).
    """
    return _reduce(per_position, student_logits, side, mask, params, _Reduction(chunk_size, mean=False))


def _masked_mean(per_position: Callable, student_logits: torch.Tensor, side: Any,
                 mask: torch.Tensor, how: _Reduction, **params) -> torch.Tensor:
    """Mean of ``per_position`` over masked positions: chunked (see _ChunkedMean) unless ``how.naive``."""
    return _reduce(per_position, student_logits, side, mask, params, how)


# ----------------------------------------------------------------------------- the losses

def forward_kl(student_logits, teacher: TeacherSignal, mask, *, chunk_size=DEFAULT_CHUNK_SIZE,
               naive=False):
    """KL(p||q) = sum_v p (log p - log q), mean over masked positions."""
    return _masked_mean(_per_position_forward_kl, student_logits, teacher, mask,
                        _Reduction(chunk_size, naive=naive))


def reverse_kl(student_logits, teacher: TeacherSignal, mask, *, chunk_size=DEFAULT_CHUNK_SIZE,
               naive=False):
    """KL(q||p) = sum_v q (log q - log p), mean over masked positions."""
    return _masked_mean(_per_position_reverse_kl, student_logits, teacher, mask,
                        _Reduction(chunk_size, naive=naive))


def generalized_jsd(student_logits, teacher: TeacherSignal, mask, *, beta=0.5,
                    chunk_size=DEFAULT_CHUNK_SIZE, naive=False):
    """beta KL(p||m) + (1-beta) KL(q||m), m = beta p + (1-beta) q.

    beta = 0 is defined as KL(p||q) and beta = 1 as KL(q||p) (GKD's convention).
    """
    return _masked_mean(_per_position_generalized_jsd, student_logits, teacher, mask,
                        _Reduction(chunk_size, naive=naive), beta=beta)


def tv_distance(student_logits, teacher: TeacherSignal, mask, *, chunk_size=DEFAULT_CHUNK_SIZE,
                naive=False):
    """Total variation 1/2 sum_v |p - q|, mean over masked positions."""
    return _masked_mean(_per_position_tv_distance, student_logits, teacher, mask,
                        _Reduction(chunk_size, naive=naive))


def skew_forward_kl(student_logits, teacher: TeacherSignal, mask, *, alpha=0.1,
                    chunk_size=DEFAULT_CHUNK_SIZE, naive=False):
    """KL(p || alpha p + (1-alpha) q), mean over masked positions."""
    return _masked_mean(_per_position_skew_forward_kl, student_logits, teacher, mask,
                        _Reduction(chunk_size, naive=naive), alpha=alpha)


def skew_reverse_kl(student_logits, teacher: TeacherSignal, mask, *, alpha=0.1,
                    chunk_size=DEFAULT_CHUNK_SIZE, naive=False):
    """KL(q || (1-alpha) p + alpha q), mean over masked positions."""
    return _masked_mean(_per_position_skew_reverse_kl, student_logits, teacher, mask,
                        _Reduction(chunk_size, naive=naive), alpha=alpha)


def sft(student_logits, teacher: Optional[TeacherSignal], mask, *, labels,
        chunk_size=DEFAULT_CHUNK_SIZE, naive=False):
    """Cross-entropy -log q(labels) of the response tokens, mean over masked positions.

    ``labels`` is [B, T] int64; ``teacher`` is ignored.
    """
    return _masked_mean(_per_position_sft, student_logits, labels, mask,
                        _Reduction(chunk_size, naive=naive))


# ----------------------------------------------------------------------------- registry

@dataclass(frozen=True)
class LossSpec:
    """A registered loss: its function and whether it needs labels. Its parameters are typed
    in ``learner.loss_params`` (``LOSS_PARAMS[name]``)."""

    name: str
    fn: Callable
    needs_labels: bool = False

    def resolve_params(self, params: Optional[dict]) -> dict:
        """``params`` with the defaults filled in, validated (LossParamsError naming the field)."""
        return parse_loss_params(self.name, params).model_dump()


LOSSES: dict[str, LossSpec] = {s.name: s for s in [
    LossSpec("forward_kl", forward_kl),
    LossSpec("reverse_kl", reverse_kl),
    LossSpec("generalized_jsd", generalized_jsd),
    LossSpec("tv_distance", tv_distance),
    LossSpec("skew_forward_kl", skew_forward_kl),
    LossSpec("skew_reverse_kl", skew_reverse_kl),
    LossSpec("sft", sft, needs_labels=True),
]}


def get_loss(name: str) -> LossSpec:
    """The registered loss called ``name``; ValueError listing the known names otherwise."""
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; known losses: {sorted(LOSSES)}")
    return LOSSES[name]


def reference_loss(name: str, student_logits, teacher, mask, **params) -> torch.Tensor:
    """The loss ``name`` computed in one unchunked, uncheckpointed pass (for benchmarks/tests)."""
    spec = get_loss(name)
    labels = params.pop("labels", None)
    extra = {"labels": labels} if spec.needs_labels else {}
    return spec.fn(student_logits, teacher, mask, naive=True, **extra, **spec.resolve_params(params))
