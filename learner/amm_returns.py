"""How AMM's on-policy term credits each sampled action: return estimators and baselines.

D_on averages the game's value v(s_t) over the states of the student's own samples, so its
gradient has a score-function part (``learner.amm``):

    grad D_on = E[ 1/|y| sum_t grad v(s_t) + sum_t grad log q(y_t|s_t) * A_t ],

and an estimator (``loss.params.returns``) chooses the advantage A_t:

- ``full`` (``FullReturns``): A_t = R - b with R = 1/|y| sum_t v(s_t), the row's whole return.
  The length |y| depends on every action (a response ends when EOS is drawn), so each action is
  credited with all of R: exact for any length.
- ``to_go`` (``ReturnsToGo``): A_t = (G_t - b_t) / |y| with G_t = sum_{t' > t} v(s_t'), lower
  variance, exact only for fixed-length responses: with EOS it treats 1/|y| as a constant and
  rewards ending early.

The baseline b (``loss.params.baseline``) is the leave-one-out mean over the batch's other
on-policy rows (``LeaveOneOut``: of R, or of G_t at the same position) or none (``NoBaseline``).
It does not depend on the row's own actions, so it adds no bias.

An estimator returns ``credit``: A_t times D_on's weight of the position, zero off the
on-policy rows. A new estimator or baseline is a subclass registered in ``RETURNS`` or
``BASELINES`` (and its name in ``learner.loss_params``' Literal for the option).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch

from learner.loss_params import AMMParams


def returns_to_go(gap: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """G_t = sum_{t' > t} gap_t' over the row's real positions."""
    g = gap * mask
    return g.flip(1).cumsum(1).flip(1) - g


# ------------------------------------------------------------------------------ baselines

class Baseline(ABC):
    """b: what an advantage subtracts from a return; it never depends on the row's own actions."""

    name: ClassVar[str]  # the name loss.params.baseline gives it

    @abstractmethod
    def of_returns(self, R: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """[B] the baseline of each row's whole return R ([B]); ``rows``: the on-policy rows."""

    @abstractmethod
    def of_returns_to_go(self, G: torch.Tensor, mask: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """[B, T] the baseline of each position's return-to-go G_t."""


@dataclass(frozen=True)
class LeaveOneOut(Baseline):
    """The mean over the OTHER ``rows`` (of R, or of G_t over the rows that reach position t);
    0 where there is no other row."""

    name = "loo"

    def of_returns(self, R: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        n = int(rows.sum())
        if n <= 1:
            return torch.zeros_like(R)
        return ((R * rows).sum() - R) / (n - 1)

    def of_returns_to_go(self, G: torch.Tensor, mask: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        m = (mask.to(torch.bool) & rows.to(torch.bool)[:, None]).to(G.dtype)
        total, count = (G * m).sum(0, keepdim=True), m.sum(0, keepdim=True)
        others = (count - m).clamp(min=1)
        return torch.where(count - m > 0, (total - G * m) / others, torch.zeros_like(G))


@dataclass(frozen=True)
class NoBaseline(Baseline):
    """b = 0."""

    name = "none"

    def of_returns(self, R: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(R)

    def of_returns_to_go(self, G: torch.Tensor, mask: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(G)


BASELINES: dict[str, type[Baseline]] = {b.name: b for b in (LeaveOneOut, NoBaseline)}


def baseline(G: torch.Tensor, mask: torch.Tensor, rows: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-position baseline of the return-to-go G by the baseline named ``kind``."""
    return BASELINES[kind]().of_returns_to_go(G, mask, rows)


# ------------------------------------------------------------------------------ estimators

@dataclass(frozen=True)
class CreditInputs:
    """What an estimator reads ([B, T] unless stated)."""

    gap: torch.Tensor    # the game's value v(s_t) (0 off the mask)
    mask: torch.Tensor   # bool: real response positions
    on: torch.Tensor     # [B] bool: the on-policy rows
    w_on: torch.Tensor   # D_on's weight of each position (learner.amm.row_weights)
    n_on: float          # the on-policy rows D_on divides by (learner.amm.row_counts)


class ReturnEstimator(ABC):
    """A_t for the score-function term, with its baseline."""

    name: ClassVar[str]  # the name loss.params.returns gives it
    baseline: Baseline

    @classmethod
    @abstractmethod
    def from_params(cls, params: AMMParams) -> "ReturnEstimator":
        """The estimator as ``loss.params`` configure it."""

    @abstractmethod
    def credit(self, x: CreditInputs) -> torch.Tensor:
        """[B, T] float64 A_t times D_on's weight of position t; 0 off the on-policy rows."""


@dataclass(frozen=True)
class FullReturns(ReturnEstimator):
    """A = R - b for every action of a row, R = 1/|y| sum_t v(s_t); divided by D_on's row count.
    ``normalize``: divide A by its spread over the on-policy rows (``loss.params.pg_normalize``),
    so the term's size does not follow the gap's (unbounded for chi2)."""

    baseline: Baseline = LeaveOneOut()
    normalize: bool = False
    name: ClassVar[str] = "full"

    @classmethod
    def from_params(cls, params: AMMParams) -> "FullReturns":
        return cls(BASELINES[params.baseline](), params.pg_normalize)

    def credit(self, x: CreditInputs) -> torch.Tensor:
        R = (x.gap * x.mask).sum(1) / x.mask.sum(1).clamp(min=1)
        advantage = R - self.baseline.of_returns(R, x.on)
        if self.normalize and int(x.on.sum()) > 1:  # unit spread: a chi2 gap's scale is unbounded
            advantage = advantage / (advantage[x.on].std() + 1e-8)
        return (x.on[:, None] & x.mask) * advantage[:, None].double() / x.n_on


@dataclass(frozen=True)
class ReturnsToGo(ReturnEstimator):
    """A_t = G_t - b_t, G_t = sum_{t' > t} v(s_t'), weighted by D_on's 1/|y| per row."""

    baseline: Baseline = LeaveOneOut()
    name: ClassVar[str] = "to_go"

    @classmethod
    def from_params(cls, params: AMMParams) -> "ReturnsToGo":
        return cls(BASELINES[params.baseline]())

    def credit(self, x: CreditInputs) -> torch.Tensor:
        G = returns_to_go(x.gap.double(), x.mask)
        return x.w_on * (G - self.baseline.of_returns_to_go(G, x.mask, x.on))


RETURNS: dict[str, type[ReturnEstimator]] = {r.name: r for r in (FullReturns, ReturnsToGo)}


def return_estimator(params: AMMParams) -> ReturnEstimator:
    """The estimator ``loss.params.returns`` names, with its baseline."""
    return RETURNS[params.returns].from_params(params)
