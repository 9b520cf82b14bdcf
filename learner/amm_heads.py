"""AMM's adversaries: the function class they play in and the Q-heads that play it.

A head maps the student's final hidden state h_s (detached, size ``hidden``) to values
f(s, .) over the vocabulary V, squashed by the class (tanh for the bounded class, nothing for
chi2). Every head is replicated on each learner rank, outside ZeRO, with its Adam state, so
its size is per-rank memory. The kinds (``HEADS``, ``loss.params.head``):

- ``linear``: W h + b, W V x hidden: hidden V + V parameters (268M at 2048 x 128k);
- ``mlp``: W2 gelu(W1 h + b1) + b2, width 2 hidden: about 2 hidden V + 4 hidden^2;
- ``lowrank``: W2 (W1 h) + b, W2 V x r, W1 r x hidden: (hidden + V) r + V parameters
  (8.7M at 2048 x 128k and r = 64, 3% of linear's); r = ``loss.params.head_rank``;
- ``logratio`` / ``logratio_lowrank``: linear / lowrank plus c * feature(log p - log q), the
  per-token log-ratio of teacher p and student q, with one learned scale c.

Why the log-ratio feature: the class's best response is a function of the log-ratio alone
(bounded: sign(log p - log q); chi2: (p/q - 1) / (2 lam), ``AdversaryClass.best_response``),
so a head with c * feature reaches it at W = 0 and c = 1/(2 lam) (chi2) or c -> inf
(bounded) whatever its rank, while a head on h alone must learn a map from the student's own
state to p - q and chases a moving target. With the feature, the low-rank part only has to
carry what the feature misses, so ``logratio_lowrank`` keeps ``logratio``'s reach at a
fraction of its size. The price: with the feature the class is unrestricted per state, so at
its optimum the head is the ``oracle`` (``loss.params.adversary``), which is the cheaper way
to play it; the heads on h alone (``linear``, ``mlp``, ``lowrank``) are the restricted classes
whose moments the paper matches.

Every head starts away from its best response: c starts at 0 and the net's output at or near
0 (``HeadKind.net``), so f is about squash(0) = 0 and the adversary has to learn its way to the gap
(``tests/unit/test_amm_learning.py``). With c = 1 at the start the chi2 ``logratio`` heads
began at the exact best response for lam = 0.5 and never had anything to learn.

A new class or head kind is a subclass registered in ``CLASSES`` or ``HEADS`` (and its name
in ``learner.loss_params``' Literal for the option).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar, Optional

import torch
from torch import nn

from learner.constants import DEFAULT_HEAD_RANK
from learner.loss_params import AMMParams

# ---------------------------------------------------------------------- function classes


class AdversaryClass(ABC):
    """The function class F the adversary plays in, and its analytic best response.

    Per state, with teacher p and student q, the adversary maximises the penalised gap
        v(f) = sum_a (p(a) - q(a)) f(a) - penalty(q, f)
    over f = squash(z) in F. ``best_response(log p - log q)`` is its argmax, and
    ``feature`` the function of the log-ratio that a log-ratio head scales towards it.
    """

    kind: ClassVar[str]  # the name loss.params.adversary_class gives it

    @classmethod
    @abstractmethod
    def from_params(cls, params: AMMParams) -> "AdversaryClass":
        """The class as ``loss.params`` configure it."""

    @abstractmethod
    def squash(self, z: torch.Tensor) -> torch.Tensor:
        """f = squash(z): maps a head's raw output into F."""

    @abstractmethod
    def feature(self, log_ratio: torch.Tensor) -> torch.Tensor:
        """What a log-ratio head adds, scaled: its best response is a function of it."""

    @abstractmethod
    def best_response(self, log_ratio: torch.Tensor) -> torch.Tensor:
        """argmax_f v(f) per token, from log p - log q."""

    @abstractmethod
    def penalty(self, q: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
        """[n] the penalty the adversary pays for f under the student's q."""

    @abstractmethod
    def clamp_binds(self, log_ratio: torch.Tensor) -> torch.Tensor:
        """[..., V] bool: where ``feature`` and ``best_response`` clamp the log-ratio, so that
        the values they give are not the class's exact ones there."""

    def penalised(self, gap: torch.Tensor, student_logits: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
        """[n] v(f) = gap - penalty(q, f), q = softmax(student_logits), in the gap's dtype."""
        return gap - self.penalty(torch.softmax(student_logits.to(gap.dtype), -1), f.to(gap.dtype))


@dataclass(frozen=True)
class BoundedClass(AdversaryClass):
    """f(s, a) in [-1, 1] (tanh), no penalty. Best response sign(p - q); the value of the game,
    sum_a |p - q|, is twice the total-variation distance."""

    kind: ClassVar[str] = "bounded"
    CLAMP: ClassVar[float] = 20.0  # |log p - log q| beyond it: tanh(c x) is sign(x) already

    @classmethod
    def from_params(cls, params: AMMParams) -> "BoundedClass":
        return cls()

    def squash(self, z: torch.Tensor) -> torch.Tensor:
        return torch.tanh(z)

    def feature(self, log_ratio: torch.Tensor) -> torch.Tensor:
        """log p - log q, clamped to [-20, 20]: tanh(c x) -> sign(x) as c grows."""
        return log_ratio.clamp(-self.CLAMP, self.CLAMP)

    def best_response(self, log_ratio: torch.Tensor) -> torch.Tensor:
        return torch.sign(log_ratio)

    def clamp_binds(self, log_ratio: torch.Tensor) -> torch.Tensor:
        return log_ratio.abs() > self.CLAMP

    def penalty(self, q: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
        return torch.zeros(q.shape[:-1], dtype=q.dtype, device=q.device)

    def penalised(self, gap: torch.Tensor, student_logits: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
        """No penalty: v(f) is the gap itself."""
        return gap


@dataclass(frozen=True)
class Chi2Class(AdversaryClass):
    """f unbounded, penalty lam * E_{a~q} f(s, a)^2. Best response f* = (p/q - 1) / (2 lam); the
    value is chi^2(p || q) / (4 lam). With f* held fixed and the penalty's q detached
    (``penalty_grad="detached"``), the student's gradient on its logits is (q - p) / (2 lam),
    forward KL's direction. Differentiating the penalty through q as well (``"full"``, the
    envelope theorem's gradient of the value) descends chi^2 itself:
    -(p^2/q - q sum_a p^2/q) / (4 lam)."""

    lam: float = 1.0
    kind: ClassVar[str] = "chi2"
    CLAMP: ClassVar[float] = 10.0  # p/q capped at e^10, so one token cannot dominate the values

    @classmethod
    def from_params(cls, params: AMMParams) -> "Chi2Class":
        return cls(params.chi2_lambda)

    def squash(self, z: torch.Tensor) -> torch.Tensor:
        return z

    def feature(self, log_ratio: torch.Tensor) -> torch.Tensor:
        """p/q - 1 = expm1(log p - log q), the ratio clamped at e^10."""
        return torch.expm1(log_ratio.clamp(max=self.CLAMP))

    def best_response(self, log_ratio: torch.Tensor) -> torch.Tensor:
        return self.feature(log_ratio) / (2 * self.lam)

    def clamp_binds(self, log_ratio: torch.Tensor) -> torch.Tensor:
        return log_ratio > self.CLAMP

    def penalty(self, q: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
        """lam * sum_a q(a) f(a)^2."""
        return self.lam * (q * f * f).sum(-1)


CLASSES: dict[str, type[AdversaryClass]] = {c.kind: c for c in (BoundedClass, Chi2Class)}


def adversary_class(params: AMMParams) -> AdversaryClass:
    """The function class ``loss.params.adversary_class`` names, configured."""
    return CLASSES[params.adversary_class].from_params(params)


# ---------------------------------------------------------------------------- head kinds

def _normal_init(net: nn.Module) -> nn.Module:
    """Weights ~ N(0, 0.02^2), biases 0, on every linear layer."""
    for m in net.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)
    return net


class HeadKind(ABC):
    """One kind of Q-head: the map h -> z it starts from, and whether it adds
    c * feature(log p - log q) to z (``reads_log_ratio``)."""

    name: ClassVar[str]  # the name loss.params.head gives it
    reads_log_ratio: ClassVar[bool] = False

    @abstractmethod
    def net(self, hidden: int, vocab: int, width: Optional[int], rank: int) -> nn.Module:
        """The map h -> z (before the feature and the squash), starting near z = 0."""


class LinearHead(HeadKind):
    """z = W h + b."""

    name = "linear"

    def net(self, hidden: int, vocab: int, width: Optional[int], rank: int) -> nn.Module:
        return _normal_init(nn.Linear(hidden, vocab))


class MLPHead(HeadKind):
    """z = W2 gelu(W1 h + b1) + b2, of ``width`` (default 2 hidden)."""

    name = "mlp"

    def net(self, hidden: int, vocab: int, width: Optional[int], rank: int) -> nn.Module:
        width = width or 2 * hidden
        return _normal_init(nn.Sequential(nn.Linear(hidden, width), nn.GELU(), nn.Linear(width, vocab)))


class LowRankHead(HeadKind):
    """z = W2 (W1 h) + b of rank r. W1 ~ N(0, 1/hidden) gives O(1) features W1 h; W2 = 0 and
    b = 0 give z = 0 exactly at the start, and W2's gradient (the features times dL/dz) is
    nonzero, so the product leaves the saddle at W2 W1 = 0 from the first step."""

    name = "lowrank"

    def net(self, hidden: int, vocab: int, width: Optional[int], rank: int) -> nn.Module:
        down, up = nn.Linear(hidden, rank, bias=False), nn.Linear(rank, vocab)
        nn.init.normal_(down.weight, std=hidden ** -0.5)
        nn.init.zeros_(up.weight)
        nn.init.zeros_(up.bias)
        return nn.Sequential(down, up)


class LogRatioHead(LinearHead):
    """linear + c * feature(log p - log q)."""

    name = "logratio"
    reads_log_ratio = True


class LogRatioLowRankHead(LowRankHead):
    """lowrank + c * feature(log p - log q)."""

    name = "logratio_lowrank"
    reads_log_ratio = True


HEADS: dict[str, HeadKind] = {k.name: k for k in (LinearHead(), MLPHead(), LogRatioHead(), LowRankHead(),
                                                   LogRatioLowRankHead())}


def head_net(kind: str, hidden: int, vocab: int, width: Optional[int] = None,
             rank: int = DEFAULT_HEAD_RANK) -> nn.Module:
    """The map h -> z of the head kind ``kind`` (``HeadKind.net``)."""
    return HEADS[kind].net(hidden, vocab, width, rank)


class QHead(nn.Module):
    """f(s, .) = squash(net(h_s) [+ c * feature(log p - log q)]): one adversary (module
    docstring for the kinds; ``rank``: the low-rank kinds' r, ``width``: the MLP's)."""

    def __init__(self, hidden: int, vocab: int, kind: str = "linear", width: Optional[int] = None,
                 cls: AdversaryClass = BoundedClass(), rank: int = DEFAULT_HEAD_RANK):
        super().__init__()
        if kind not in HEADS:
            raise ValueError(f"unknown AMM head {kind!r}; loss.params.head must be one of {tuple(HEADS)}")
        if rank < 1:
            raise ValueError(f"loss.params.head_rank={rank!r} must be an integer >= 1")
        self.cls, self.kind = cls, kind
        self.net = head_net(kind, hidden, vocab, width, rank)
        # c = 0: the head starts at f = squash(net(h)), never at the best response (docstring)
        self.scale = nn.Parameter(torch.zeros(())) if HEADS[kind].reads_log_ratio else None

    @property
    def needs_log_ratio(self) -> bool:
        """Whether ``forward`` needs the teacher/student log-ratio."""
        return self.scale is not None

    def forward(self, h: torch.Tensor, log_ratio: Optional[torch.Tensor] = None) -> torch.Tensor:
        z = self.net(h.to(self.net_dtype))
        if self.scale is not None:
            if log_ratio is None:
                raise ValueError(f"the {self.kind!r} AMM head needs the teacher/student log-ratio")
            z = z + self.scale * self.cls.feature(log_ratio.to(z.dtype))
        return self.cls.squash(z)

    @property
    def net_dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype


def head_parameter_count(hidden: int, vocab: int, kind: str, rank: int = DEFAULT_HEAD_RANK,
                         width: Optional[int] = None) -> int:
    """Parameters of one head, counted on the meta device (nothing is allocated)."""
    with torch.device("meta"):
        head = QHead(hidden, vocab, kind, width, rank=rank)
    return sum(p.numel() for p in head.parameters())
