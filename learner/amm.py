"""Adversarial moment matching (AMM, arXiv 2406.02959): adversaries, moment gap, both losses.

Per state s (prompt plus response prefix) with teacher p = pi*(.|s), student q = pi_theta(.|s)
and an adversary f(s, .) in [-1, 1]^V, the moment gap is

    g_f(s) = sum_a (p(a) - q(a)) f(s, a)                                  (``moment_gap``)

The on-policy distance averages g over the states of the student's own samples, the
off-policy distance over the teacher's samples, each per response (1/|y| sum_t g(s_t)) and
then over responses:  L = beta * D_off(f_off) + (1 - beta) * D_on(f_on).
The adversaries ascend L; the student descends it. D_off differentiates directly (its states
do not depend on theta). D_on's states are sampled from theta, so its gradient adds a
score-function term (``student_loss``):

    grad D_on = E[ 1/|y| sum_t grad g(s_t) + sum_t grad log q(y_t|s_t) * (R - b) ],
    R = 1/|y| sum_t g(s_t)                                   (``returns="full"``, default)

The length |y| depends on every action (a response ends when EOS is drawn), so each action
is credited with the whole return R: this is exact for any length. ``returns="to_go"`` uses
the lower-variance return-to-go 1/|y| sum_{t'>t} g(s_t') instead, which is exact only for
fixed-length responses: with EOS it treats 1/|y| as a constant and rewards ending early
(measured: the student learns to stop at once). The baseline b is the leave-one-out mean over
the batch's other on-policy rows (of R, or of the return-to-go at the same position): it does
not depend on the row's own actions, so it adds no bias. Rows sampled by an older weight
version mu get a per-token importance ratio min(q(y_t|s_t) / mu(y_t|s_t), ratio_clip) (1 for
fresh rows).

Top-k teacher signal. sum_a p(a) f(a) is the exact top-k part plus the tail mass times an
estimate of f over the tail; ``tail="student_mean"`` (default) uses the student-weighted mean
of f over the tokens outside the top-k, ``tail="zero"`` drops the tail (f = 0 there). With
k = V both are exact. The student term sum_a q(a) f(a) is always exact.

The adversaries are Q-heads on the student's final hidden state (detached), with the class
they play in, in ``learner.amm_heads`` (re-exported here): linear, MLP, low-rank, and linear
or low-rank plus a scaled log-ratio feature.
All maths works through positions in chunks (``learner.losses.chunked_sum``), so no [N, V]
intermediate beyond the gradient buffer is ever alive.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

# AdversaryClass and QHead live in learner.amm_heads; importable from here as before.
from learner.amm_heads import AdversaryClass, QHead
from learner.constants import DEFAULT_CHUNK_SIZE, TAIL_LOG_FLOOR
from learner.losses import _NEG, _select, chunked_sum, compute_dtype, topk_cover
from learner.teacher_signal import TeacherSignal

def log_ratio(student_logits: torch.Tensor, teacher: TeacherSignal) -> torch.Tensor:
    """[..., V] log p(a) - log q(a). With a top-k signal a token outside the top-k gets the
    tail's ratio log p_tail - log q_tail (the same student-proportional tail as the gap)."""
    dt = compute_dtype(student_logits)
    logq = torch.log_softmax(student_logits.to(dt), -1)
    if isinstance(teacher, torch.Tensor):
        return torch.log_softmax(teacher.to(dt), -1) - logq
    v = logq.shape[-1]
    valid, covered = topk_cover(teacher, v)
    ids = torch.where(valid, teacher.ids, v)
    logq_tail = torch.logsumexp(logq.masked_fill(covered, _NEG), -1).clamp(min=TAIL_LOG_FLOOR)
    out = (teacher.tail_logmass.to(dt).clamp(min=TAIL_LOG_FLOOR) - logq_tail)[..., None].expand_as(logq).clone()
    top = teacher.logprobs.to(dt) - logq.gather(-1, ids.clamp(max=v - 1))
    # A padded slot must write nowhere new: it repeats the row's first real slot (same index,
    # same value), or, in a row with none, rewrites the last column's own value. Sending it to
    # column V-1 with another value would race a real slot naming token V-1.
    has = valid.any(-1, keepdim=True)
    first = valid.to(torch.int8).argmax(-1, keepdim=True)
    safe_id = torch.where(has, ids.gather(-1, first), v - 1)
    safe_val = torch.where(has, top.gather(-1, first), out[..., -1:])
    return out.scatter(-1, torch.where(valid, ids, safe_id), torch.where(valid, top, safe_val))


# ------------------------------------------------------------------------ the moment gap

def _gap_rows(student: torch.Tensor, teacher: TeacherSignal, f: torch.Tensor, tail: str) -> torch.Tensor:
    """g = sum_a (p - q) f for [n, V] student logits, teacher rows and [n, V] adversary values."""
    dt = compute_dtype(student)
    s, f = student.to(dt), f.to(dt)
    q = torch.softmax(s, dim=-1)
    student_term = (q * f).sum(-1)
    if isinstance(teacher, torch.Tensor):
        return (torch.softmax(teacher.to(dt), dim=-1) * f).sum(-1) - student_term
    valid, covered = topk_cover(teacher, s.shape[-1])
    p_k = torch.where(valid, teacher.logprobs.to(dt).exp(), torch.zeros((), dtype=dt, device=s.device))
    top = (p_k * f.gather(1, teacher.ids)).sum(-1)
    if tail == "zero":
        return top - student_term
    w_tail = torch.softmax(s.masked_fill(covered, _NEG), dim=-1)  # q restricted to the tail
    p_tail = teacher.tail_logmass.to(dt).clamp(min=TAIL_LOG_FLOOR).exp()
    p_tail = torch.where(covered.all(-1), torch.zeros_like(p_tail), p_tail)
    return top + p_tail * (w_tail * f).sum(-1) - student_term


def moment_gap(student_logits: torch.Tensor, teacher: TeacherSignal, q_values: torch.Tensor,
               mask: torch.Tensor, tail: str = "student_mean") -> torch.Tensor:
    """[B, T] gap sum_a (pi*(a|s_t) - pi_theta(a|s_t)) f(s_t, a); 0 where ``mask`` is false."""
    m = mask.to(torch.bool)
    out = torch.zeros(m.shape, dtype=compute_dtype(student_logits), device=student_logits.device)
    if m.any():
        idx = m.nonzero(as_tuple=True)
        out = out.index_put(idx, _gap_rows(student_logits[idx], _select(teacher, idx), q_values[idx], tail))
    return out


# --------------------------------------------------------------------- distances, weights

def row_counts(is_on_policy: torch.Tensor, totals: Optional[tuple[int, int, int]] = None) -> tuple[float, float]:
    """The numbers of on- and off-policy rows a rank divides by.

    ``totals`` = (on-policy rows, off-policy rows, ranks) of the whole learner batch. A rank
    divides by the batch's counts over the number of ranks, so that the mean of the ranks'
    losses (what data-parallel training descends) is the whole batch's loss even when its
    rows do not split evenly between ranks. None: this rank's rows are the whole batch.
    """
    if totals is None:
        on = is_on_policy.to(torch.bool)
        return float(max(int(on.sum()), 1)), float(max(int((~on).sum()), 1))
    n_on, n_off, ranks = totals
    return max(n_on, 1) / ranks, max(n_off, 1) / ranks


def row_weights(mask: torch.Tensor, is_on_policy: torch.Tensor, beta: float,
                totals: Optional[tuple[int, int, int]] = None) -> tuple[torch.Tensor, ...]:
    """Per-position weights w with sum_t w g_t = the batch's D_on, D_off and L.

    A row's positions get 1/|y| divided by the number of rows of its kind (``row_counts``);
    L's weights scale the on-policy rows by (1 - beta) and the off-policy rows by beta.
    Returns (w_on, w_off, w_L).
    """
    m = mask.to(torch.float64)
    lengths = m.sum(1).clamp(min=1)
    on = is_on_policy.to(torch.bool)
    n_on, n_off = row_counts(on, totals)
    per_pos = m / lengths[:, None]
    w_on = per_pos * on[:, None] / n_on
    w_off = per_pos * (~on)[:, None] / n_off
    return w_on, w_off, (1 - beta) * w_on + beta * w_off


def returns_to_go(gap: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """G_t = sum_{t' > t} gap_t' over the row's real positions."""
    g = gap * mask
    return g.flip(1).cumsum(1).flip(1) - g


def baseline(G: torch.Tensor, mask: torch.Tensor, rows: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-position baseline: the mean of G_t over the OTHER ``rows`` that reach position t."""
    if kind == "none":
        return torch.zeros_like(G)
    m = (mask.to(torch.bool) & rows.to(torch.bool)[:, None]).to(G.dtype)
    total, count = (G * m).sum(0, keepdim=True), m.sum(0, keepdim=True)
    others = (count - m).clamp(min=1)
    return torch.where(count - m > 0, (total - G * m) / others, torch.zeros_like(G))


# ---------------------------------------------------------------------------- the losses

def position_chunks(mask: torch.Tensor, chunk_size: int):
    """(rows, cols) index tuples of the masked positions, ``chunk_size`` at a time."""
    rows, cols = mask.to(torch.bool).nonzero(as_tuple=True)
    for start in range(0, rows.numel(), chunk_size):
        yield rows[start:start + chunk_size], cols[start:start + chunk_size]


def oracle_values(cls: AdversaryClass, student_logits: torch.Tensor, teacher: TeacherSignal,
                  index: tuple) -> torch.Tensor:
    """[n, V] the class's best response at positions ``index`` (the same on both row kinds)."""
    return cls.best_response(log_ratio(student_logits[index].detach(), _select(teacher, index)))


def adversary_values(heads: tuple[QHead, QHead], hidden: torch.Tensor, student_logits: torch.Tensor,
                     teacher: TeacherSignal, is_on_policy: torch.Tensor, index: tuple) -> torch.Tensor:
    """[n, V] values f(s, .) at positions ``index``: f_on on student rows, f_off on teacher rows."""
    h = hidden[index].detach()
    ratio = (log_ratio(student_logits[index].detach(), _select(teacher, index))
             if heads[0].needs_log_ratio else None)
    on = is_on_policy.to(torch.bool)[index[0]]

    def run(head: QHead, rows: torch.Tensor) -> torch.Tensor:  # a head only on its own rows
        return head(h[rows], None if ratio is None else ratio[rows])
    f_on, f_off = run(heads[0], on), run(heads[1], ~on)
    f = f_on.new_empty(len(h), f_on.shape[-1])
    f[on], f[~on] = f_on, f_off
    return f


def _values_at(q_values: Any) -> Callable[[tuple], torch.Tensor]:
    """Adversary values as a function of positions, from a [B, T, V] tensor or such a function."""
    return q_values if callable(q_values) else (lambda index: q_values[index])


def _value_rows(x: torch.Tensor, teacher: TeacherSignal, f: torch.Tensor, tail: str, cls: AdversaryClass,
                penalised: bool) -> torch.Tensor:
    """[n] the game's value at each state: the gap, minus the class's penalty if ``penalised``."""
    gap = _gap_rows(x, teacher, f, tail)
    if not penalised or cls.kind == "bounded":
        return gap
    return gap - cls.penalty(torch.softmax(x.to(gap.dtype), -1), f.to(gap.dtype))


def _student_terms(x, side, tail, f_at, cls, penalised, temperature):
    """w_direct * v(s) + w_pg * log q_T(y|s) for [n, V] student logits (f is held fixed)."""
    teacher, rows, cols, y, w_direct, w_pg = side
    with torch.no_grad():
        f = f_at((rows, cols)).detach()
    value = _value_rows(x, teacher, f, tail, cls, penalised)
    logq = torch.log_softmax(x.to(value.dtype) / temperature, dim=-1).gather(1, y[:, None])[:, 0]
    return w_direct.to(value.dtype) * value + w_pg.to(value.dtype) * logq


@dataclass
class StudentInputs:
    """What the student loss needs from a batch (shapes [B, T] unless stated)."""
    response_ids: torch.Tensor
    mask: torch.Tensor
    is_on_policy: torch.Tensor       # [B]
    behavior_logprobs: torch.Tensor


@torch.no_grad()
def _gaps_and_logq(student_logits, teacher, f_at, y, mask, tail, chunk_size, cls, penalised, temperature):
    """[B, T] values of the game (the moment gap, less the penalty if ``penalised``), the
    penalised values, and log q_T(y_t|s_t) under the sampling temperature, a chunk at a time."""
    dt = compute_dtype(student_logits)
    gap, value, logq = (torch.zeros(mask.shape, dtype=dt, device=student_logits.device) for _ in range(3))
    for index in position_chunks(mask, chunk_size):
        x = student_logits[index].detach().to(dt)
        f = f_at(index).detach()
        gap[index] = _value_rows(x, _select(teacher, index), f, tail, cls, penalised)
        value[index] = _value_rows(x, _select(teacher, index), f, tail, cls, True)
        logq[index] = torch.log_softmax(x / temperature, -1).gather(1, y[index][:, None])[:, 0]
    return gap, value, logq


def student_loss(student_logits: torch.Tensor, teacher: TeacherSignal, q_values: Any,
                 batch: StudentInputs, beta: float, *, tail: str = "student_mean",
                 baseline_kind: str = "loo", ratio_clip: float = 2.0, returns: str = "full",
                 pg_coef: float = 1.0, cls: AdversaryClass = AdversaryClass(),
                 penalty_grad: str = "detached", temperature: float = 1.0,
                 totals: Optional[tuple[int, int, int]] = None, pg_normalize: bool = False,
                 chunk_size: int = DEFAULT_CHUNK_SIZE) -> tuple[torch.Tensor, dict[str, float]]:
    """The student's surrogate: its gradient estimates grad L (see the module docstring).

    ``q_values`` are the adversaries' values, f_on on on-policy rows and f_off on off-policy
    rows, as a [B, T, V] tensor or a function of a (rows, cols) index (so they too are built a
    chunk at a time); they are treated as constants here. ``cls``/``penalty_grad``: a chi2
    adversary's penalty is part of what the student descends only with "full"
    (``AdversaryClass``). ``temperature``: the rollouts' sampling temperature, so the
    policy-gradient term and the importance ratio use the policy that sampled (q at T).
    ``totals``: the whole batch's row counts (``row_counts``). ``pg_normalize``: divide the
    advantages (R - b, ``returns="full"``) by their spread over the on-policy rows, so the
    policy-gradient term's size does not follow the gap's (unbounded for chi2).
    """
    mask, on = batch.mask.to(torch.bool), batch.is_on_policy.to(torch.bool)
    f_at, y = _values_at(q_values), batch.response_ids.long()
    penalised = penalty_grad == "full"
    gap, value, logq = _gaps_and_logq(student_logits, teacher, f_at, y, mask, tail, chunk_size, cls,
                                      penalised, temperature)
    with torch.no_grad():
        w_on, w_off, w_all = row_weights(mask, on, beta, totals)
        n_on_norm = row_counts(on, totals)[0]
        if returns == "full":  # every action of a row is credited with the row's return R
            R = (gap * mask).sum(1) / mask.sum(1).clamp(min=1)
            n_on = int(on.sum())
            b = ((R * on).sum() - R) / max(n_on - 1, 1) if baseline_kind == "loo" and n_on > 1 \
                else torch.zeros_like(R)
            advantage = R - b
            if pg_normalize and n_on > 1:  # unit spread: a chi2 gap's scale is unbounded
                advantage = advantage / (advantage[on].std() + 1e-8)
            credit = (on[:, None] & mask) * advantage[:, None].double() / n_on_norm
        else:
            G = returns_to_go(gap.double(), mask)
            credit = w_on * (G - baseline(G, mask, on, baseline_kind))
        ratio = (logq - batch.behavior_logprobs.to(logq.dtype)).exp().clamp(max=ratio_clip)
        w_pg = pg_coef * (1 - beta) * ratio.double() * credit  # zero on off-policy rows
    b_idx, t_idx = torch.meshgrid(torch.arange(mask.shape[0], device=mask.device),
                                  torch.arange(mask.shape[1], device=mask.device), indexing="ij")
    side = (teacher, b_idx, t_idx, y, w_all, w_pg)
    loss = chunked_sum(_student_terms, student_logits, side, mask, chunk_size, tail=tail, f_at=f_at,
                       cls=cls, penalised=penalised, temperature=temperature)
    d_on, d_off = float((w_on * value).sum()), float((w_off * value).sum())
    return loss, {"d_on": d_on, "d_off": d_off, "amm_objective": (1 - beta) * d_on + beta * d_off}


@torch.no_grad()
def true_distances(student_logits: torch.Tensor, teacher: TeacherSignal, mask: torch.Tensor,
                   is_on_policy: torch.Tensor, cls: AdversaryClass, tail: str,
                   totals: Optional[tuple[int, int, int]] = None,
                   chunk_size: int = DEFAULT_CHUNK_SIZE) -> dict[str, float]:
    """D_on and D_off at the class's best response: what a perfect adversary would measure
    (bounded: sum |p - q|; chi2: chi^2(p || q) / (4 lam)), to set beside the learned ones."""
    dt = compute_dtype(student_logits)
    value = torch.zeros(mask.shape, dtype=dt, device=student_logits.device)
    for index in position_chunks(mask, chunk_size):
        f = oracle_values(cls, student_logits, teacher, index)
        value[index] = _value_rows(student_logits[index].detach().to(dt), _select(teacher, index), f, tail,
                                   cls, True)
    w_on, w_off, _ = row_weights(mask, is_on_policy, 0.5, totals)
    return {"d_on_true": float((w_on * value).sum()), "d_off_true": float((w_off * value).sum())}


def adversary_step(heads: tuple[QHead, QHead], optimizer: torch.optim.Optimizer, hidden: torch.Tensor,
                   student_logits: torch.Tensor, teacher: TeacherSignal, mask: torch.Tensor,
                   is_on_policy: torch.Tensor, beta: float, tail: str,
                   reduce_grads: Callable[[list[torch.Tensor]], None] = lambda grads: None,
                   chunk_size: int = DEFAULT_CHUNK_SIZE, totals: Optional[tuple[int, int, int]] = None) -> float:
    """One ascent step of both adversaries on L (minimising -L); returns -L before the step.

    L is the moment gap less the class's penalty (chi2: lam * E_q f^2, q the student's,
    detached). The gradient is accumulated a chunk of positions at a time, so only one
    chunk's [n, V] values and gap terms exist at once.
    """
    _, _, w_all = row_weights(mask, is_on_policy, beta, totals)
    cls = heads[0].cls
    optimizer.zero_grad(set_to_none=False)
    total = 0.0
    for index in position_chunks(mask, chunk_size):
        f = adversary_values(heads, hidden, student_logits, teacher, is_on_policy, index)
        gap = _value_rows(student_logits[index].detach(), _select(teacher, index), f, tail, cls, True)
        loss = -(w_all[index].to(gap.dtype) * gap).sum()
        loss.backward()
        total += float(loss.detach())
    params = [p for head in heads for p in head.parameters()]
    for p in params:  # a rank with no positions still takes part in the gradient all-reduce
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    reduce_grads([p.grad for p in params])
    optimizer.step()
    return total
