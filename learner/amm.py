"""Adversarial moment matching (AMM, arXiv 2406.02959): adversaries, moment gap, both losses.

Per state s (prompt plus response prefix) with teacher p = pi*(.|s), student q = pi_theta(.|s)
and an adversary f(s, .) from a function class F (``learner.amm_heads``), the moment gap is

    g_f(s) = sum_a (p(a) - q(a)) f(s, a)                                  (``moment_gap``)

and the game's value v_f(s) = g_f(s) - penalty(q, f), the class's penalty (0 for the bounded
class, lam E_q f^2 for chi2). The on-policy distance averages v over the states of the
student's own samples, the off-policy distance over the teacher's samples, each per response
(1/|y| sum_t v(s_t)) and then over responses:  L = beta * D_off(f_off) + (1 - beta) * D_on(f_on).
The adversaries ascend L (``adversary_step``); the student descends it (``student_loss``).
D_off differentiates directly (its states do not depend on theta). D_on's states are sampled
from theta, so its gradient adds a score-function term:

    grad D_on = E[ 1/|y| sum_t grad v(s_t) + sum_t grad log q(y_t|s_t) * A_t ],

with the advantage A_t from a return estimator and its baseline (``learner.amm_returns``).
Rows sampled by an older weight version mu get a per-token importance ratio
min(q(y_t|s_t) / mu(y_t|s_t), ratio_clip) (1 for fresh rows).

Top-k teacher signal. sum_a p(a) f(a) is the exact top-k part plus the tail mass times an
estimate of f over the tail; ``tail="student_mean"`` (default) uses the student-weighted mean
of f over the tokens outside the top-k, ``tail="zero"`` drops the tail (f = 0 there). With
k = V both are exact. The student term sum_a q(a) f(a) is always exact.

The variants are objects built once from ``loss.params`` (``AMMSettings.from_params``): the
class (``AdversaryClass``), the Q-head kind (``QHead``, ``learner.amm_heads``), the return
estimator (``ReturnEstimator``, ``learner.amm_returns``) and the adversary that plays
(``LearnedAdversary`` heads or the class's ``OracleAdversary``, ``ADVERSARIES`` here).
All maths works through positions in chunks (``learner.losses.chunked_sum``), so no [N, V]
intermediate beyond the gradient buffer is ever alive.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Protocol

import torch

# The classes and heads live in learner.amm_heads, the estimators in learner.amm_returns; the
# ones callers used to import from here still can be (re-exports).
from learner.amm_heads import AdversaryClass, BoundedClass, Chi2Class, QHead, adversary_class  # noqa: F401
from learner.amm_returns import (CreditInputs, FullReturns, ReturnEstimator, ReturnsToGo,  # noqa: F401
                                 baseline, return_estimator, returns_to_go)
from learner.constants import DEFAULT_CHUNK_SIZE, TAIL_LOG_FLOOR
from learner.loss_params import AMMParams
from learner.losses import _NEG, _select, chunked_sum, compute_dtype, topk_cover
from learner.teacher_signal import TeacherSignal

Totals = Optional[tuple[int, int, int]]  # (on-policy rows, off-policy rows, ranks) of the whole batch


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

def row_counts(is_on_policy: torch.Tensor, totals: Totals = None) -> tuple[float, float]:
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
                totals: Totals = None) -> tuple[torch.Tensor, ...]:
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


# ------------------------------------------------------------------ settings and inputs

@dataclass(frozen=True)
class AMMSettings:
    """How one step plays the game; built once from ``loss.params`` (``from_params``).

    ``beta``: L's off-policy weight. ``tail``: f over the top-k tail. ``chunk_size``: positions
    a chunk. ``cls``: the function class. ``estimator``: A_t of the score-function term.
    ``pg_coef``: that term's weight (1 = the exact gradient of D_on). ``ratio_clip``: cap of
    q_T / mu. ``penalised``: the student descends v = gap - penalty (chi2's
    ``penalty_grad="full"``) instead of the gap alone. ``temperature``: the rollouts' sampling
    temperature, so the score and the ratio use the policy that sampled (q at T).
    """

    beta: float
    tail: str = "student_mean"
    chunk_size: int = DEFAULT_CHUNK_SIZE
    cls: AdversaryClass = field(default_factory=BoundedClass)
    estimator: ReturnEstimator = field(default_factory=FullReturns)
    pg_coef: float = 1.0
    ratio_clip: float = 2.0
    penalised: bool = False
    temperature: float = 1.0

    @classmethod
    def from_params(cls, params: AMMParams, temperature: float = 1.0) -> "AMMSettings":
        """The settings ``loss.params`` name, with their class and estimator objects."""
        return cls(beta=params.beta, tail=params.tail, chunk_size=params.chunk_size,
                   cls=adversary_class(params), estimator=return_estimator(params), pg_coef=params.pg_coef,
                   ratio_clip=params.ratio_clip, penalised=params.penalty_grad == "full",
                   temperature=temperature)


@dataclass
class StudentInputs:
    """What the student loss needs from a batch (shapes [B, T] unless stated)."""
    response_ids: torch.Tensor
    mask: torch.Tensor
    is_on_policy: torch.Tensor       # [B]
    behavior_logprobs: torch.Tensor
    totals: Totals = None            # the whole batch's row counts (``row_counts``)


@dataclass
class GameInputs:
    """What the adversaries see of a batch ([B, T] unless stated)."""
    student_logits: torch.Tensor     # [B, T, V]
    teacher: TeacherSignal
    mask: torch.Tensor
    is_on_policy: torch.Tensor       # [B]
    hidden: Optional[torch.Tensor] = None  # [B, T, H] the student's final hidden state (learned heads)
    totals: Totals = None


# ----------------------------------------------------------------- values at positions

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
    """[n] the game's value at each state: the gap, less the class's penalty if ``penalised``."""
    gap = _gap_rows(x, teacher, f, tail)
    return cls.penalised(gap, x, f) if penalised else gap


# --------------------------------------------------------------------- the student's loss

def _student_terms(x: torch.Tensor, side: tuple, f_at: Callable, settings: AMMSettings) -> torch.Tensor:
    """w_direct * v(s) + w_pg * log q_T(y|s) for [n, V] student logits (f is held fixed)."""
    teacher, rows, cols, y, w_direct, w_pg = side
    with torch.no_grad():
        f = f_at((rows, cols)).detach()
    value = _value_rows(x, teacher, f, settings.tail, settings.cls, settings.penalised)
    logq = torch.log_softmax(x.to(value.dtype) / settings.temperature, dim=-1).gather(1, y[:, None])[:, 0]
    return w_direct.to(value.dtype) * value + w_pg.to(value.dtype) * logq


@torch.no_grad()
def _gaps_and_logq(student_logits: torch.Tensor, teacher: TeacherSignal, f_at: Callable, batch: StudentInputs,
                   settings: AMMSettings) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[B, T] values of the game as the student descends them (the gap, less the penalty if
    ``settings.penalised``), the penalised values, and log q_T(y_t|s_t) under the sampling
    temperature, a chunk at a time."""
    mask, y, s = batch.mask.to(torch.bool), batch.response_ids.long(), settings
    dt = compute_dtype(student_logits)
    gap, value, logq = (torch.zeros(mask.shape, dtype=dt, device=student_logits.device) for _ in range(3))
    for index in position_chunks(mask, s.chunk_size):
        x = student_logits[index].detach().to(dt)
        f = f_at(index).detach()
        gap[index] = _value_rows(x, _select(teacher, index), f, s.tail, s.cls, s.penalised)
        value[index] = _value_rows(x, _select(teacher, index), f, s.tail, s.cls, True)
        logq[index] = torch.log_softmax(x / s.temperature, -1).gather(1, y[index][:, None])[:, 0]
    return gap, value, logq


@torch.no_grad()
def _pg_weights(gap: torch.Tensor, logq: torch.Tensor, batch: StudentInputs, settings: AMMSettings,
                w_on: torch.Tensor) -> torch.Tensor:
    """[B, T] w_pg = pg_coef (1 - beta) min(q_T / mu, ratio_clip) * credit, the score term's
    weights (zero on off-policy rows); the credit is the estimator's A_t times D_on's weight."""
    mask, on = batch.mask.to(torch.bool), batch.is_on_policy.to(torch.bool)
    credit = settings.estimator.credit(CreditInputs(gap, mask, on, w_on, row_counts(on, batch.totals)[0]))
    ratio = (logq - batch.behavior_logprobs.to(logq.dtype)).exp().clamp(max=settings.ratio_clip)
    return settings.pg_coef * (1 - settings.beta) * ratio.double() * credit


def student_loss(student_logits: torch.Tensor, teacher: TeacherSignal, q_values: Any,
                 batch: StudentInputs, settings: AMMSettings) -> tuple[torch.Tensor, dict[str, float]]:
    """The student's surrogate: its gradient estimates grad L (see the module docstring),

        sum_t w_t v(s_t) + sum_t w_pg,t log q_T(y_t|s_t),

    w the per-position weights of L (``row_weights``) and w_pg the score term's (``_pg_weights``).
    ``q_values`` are the adversaries' values, f_on on on-policy rows and f_off on off-policy
    rows, as a [B, T, V] tensor or a function of a (rows, cols) index (so they too are built a
    chunk at a time); they are treated as constants here. Returns the loss and D_on, D_off, L
    at the penalised value.
    """
    mask, on = batch.mask.to(torch.bool), batch.is_on_policy.to(torch.bool)
    f_at, beta = _values_at(q_values), settings.beta
    gap, value, logq = _gaps_and_logq(student_logits, teacher, f_at, batch, settings)
    with torch.no_grad():
        w_on, w_off, w_all = row_weights(mask, on, beta, batch.totals)
    w_pg = _pg_weights(gap, logq, batch, settings, w_on)
    b_idx, t_idx = torch.meshgrid(torch.arange(mask.shape[0], device=mask.device),
                                  torch.arange(mask.shape[1], device=mask.device), indexing="ij")
    side = (teacher, b_idx, t_idx, batch.response_ids.long(), w_all, w_pg)
    loss = chunked_sum(_student_terms, student_logits, side, mask, settings.chunk_size, f_at=f_at,
                       settings=settings)
    d_on, d_off = float((w_on * value).sum()), float((w_off * value).sum())
    return loss, {"d_on": d_on, "d_off": d_off, "amm_objective": (1 - beta) * d_on + beta * d_off}


@torch.no_grad()
def true_distances(game: GameInputs, settings: AMMSettings) -> dict[str, float]:
    """D_on and D_off at the class's best response: what a perfect adversary would measure
    (bounded: sum |p - q|, twice the TV distance; chi2: chi^2(p || q) / (4 lam)), to set beside
    the learned ones; and ``log_ratio_clamped``, the fraction of this rank's response positions
    where the class clamps log p - log q for some token (chi2 above 10, bounded beyond 20), so
    that the values there are not the class's exact ones."""
    logits, s = game.student_logits, settings
    value = torch.zeros(game.mask.shape, dtype=compute_dtype(logits), device=logits.device)
    clamped = torch.zeros((), dtype=torch.long, device=logits.device)  # one sync at the end, not per chunk
    for index in position_chunks(game.mask, s.chunk_size):
        teacher = _select(game.teacher, index)
        ratio = log_ratio(logits[index].detach(), teacher)
        clamped += s.cls.clamp_binds(ratio).any(-1).sum()
        value[index] = _value_rows(logits[index].detach().to(value.dtype), teacher, s.cls.best_response(ratio),
                                   s.tail, s.cls, True)
    w_on, w_off, _ = row_weights(game.mask, game.is_on_policy, 0.5, game.totals)
    return {"d_on_true": float((w_on * value).sum()), "d_off_true": float((w_off * value).sum()),
            "log_ratio_clamped": int(clamped) / max(int(game.mask.sum()), 1)}


# ---------------------------------------------------------------------------- adversaries

def _no_reduce(grads: list[torch.Tensor]) -> None:
    """One rank: nothing to average."""


def adversary_step(heads: tuple[QHead, QHead], optimizer: torch.optim.Optimizer, game: GameInputs,
                   settings: AMMSettings,
                   reduce_grads: Callable[[list[torch.Tensor]], None] = _no_reduce) -> float:
    """One ascent step of both adversaries on L (minimising -L); returns -L before the step.

    L is the moment gap less the class's penalty (chi2: lam * E_q f^2, q the student's,
    detached), weighted by ``row_weights`` at ``settings.beta``. The gradient is accumulated a
    chunk of positions at a time, so only one chunk's [n, V] values and gap terms exist at
    once; ``reduce_grads`` averages it over the learner ranks before the step.
    """
    _, _, w_all = row_weights(game.mask, game.is_on_policy, settings.beta, game.totals)
    cls = heads[0].cls
    optimizer.zero_grad(set_to_none=False)
    total = 0.0
    for index in position_chunks(game.mask, settings.chunk_size):
        f = adversary_values(heads, game.hidden, game.student_logits, game.teacher, game.is_on_policy, index)
        gap = _value_rows(game.student_logits[index].detach(), _select(game.teacher, index), f, settings.tail,
                          cls, True)
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


class Adversary(Protocol):
    """Who plays f: ``ascend`` takes the step's ascent (None if nothing learns), ``values``
    gives f at a chunk of positions for the student's loss."""

    def ascend(self, game: GameInputs, settings: AMMSettings) -> Optional[float]: ...

    def values(self, game: GameInputs, index: tuple) -> torch.Tensor: ...


@dataclass
class LearnedAdversary:
    """Two Q-heads, f_on on the student's rows and f_off on the teacher's, ascending L."""

    heads: tuple[QHead, QHead]
    optimizer: torch.optim.Optimizer
    reduce_grads: Callable[[list[torch.Tensor]], None] = _no_reduce

    def ascend(self, game: GameInputs, settings: AMMSettings) -> float:
        return adversary_step(self.heads, self.optimizer, game, settings, self.reduce_grads)

    def values(self, game: GameInputs, index: tuple) -> torch.Tensor:
        return adversary_values(self.heads, game.hidden, game.student_logits, game.teacher, game.is_on_policy,
                                index)


@dataclass
class OracleAdversary:
    """The class's analytic best response at every state (a diagnosis: what the objective does
    with a perfect adversary); nothing to learn."""

    cls: AdversaryClass

    def ascend(self, game: GameInputs, settings: AMMSettings) -> None:
        return None

    def values(self, game: GameInputs, index: tuple) -> torch.Tensor:
        return oracle_values(self.cls, game.student_logits, game.teacher, index)


def _oracle(heads: tuple[QHead, QHead], optimizer: torch.optim.Optimizer,
            reduce_grads: Callable) -> OracleAdversary:
    return OracleAdversary(heads[0].cls)


# loss.params.adversary -> a builder from the objective's heads, their optimiser and gradient reduction.
ADVERSARIES: dict[str, Callable[..., Adversary]] = {"learned": LearnedAdversary, "oracle": _oracle}
