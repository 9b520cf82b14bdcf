"""AMM's variants are objects built once from the typed parameters.

- every option the typed parameters allow has its class in a registry, and no registry holds
  a name the parameters refuse;
- ``AMMSettings.from_params`` and ``AMMObjective`` build the objects the parameters name;
- the baselines and estimators are what learner.amm computed inline before (float64).
"""
from typing import get_args

import pytest
import torch

from learner.amm import ADVERSARIES, AMMSettings, LearnedAdversary, OracleAdversary
from learner.amm_heads import CLASSES, HEADS, AdversaryClass, BoundedClass, Chi2Class, QHead
from learner.amm_returns import (BASELINES, RETURNS, CreditInputs, FullReturns, LeaveOneOut, NoBaseline,
                                 ReturnsToGo, baseline, returns_to_go)
from learner.loss_params import (AdversaryName, AMMParams, BaselineName, ClassName, HeadName, ReturnsName,
                                 ScheduleName, parse_loss_params)
from learner.schedule import SCHEDULES


@pytest.mark.parametrize("option,registry", [(ClassName, CLASSES), (HeadName, HEADS), (ReturnsName, RETURNS),
                                             (BaselineName, BASELINES), (AdversaryName, ADVERSARIES)])
def test_every_option_has_its_class(option, registry):
    assert get_args(option) == tuple(registry)


def test_the_schedule_names_are_the_schedules():
    assert get_args(ScheduleName) == SCHEDULES


def test_settings_are_built_from_the_params():
    s = AMMSettings.from_params(AMMParams(), temperature=0.7)
    assert s.cls == Chi2Class(0.5) and s.estimator == FullReturns(LeaveOneOut(), False)
    assert (s.beta, s.tail, s.chunk_size, s.pg_coef, s.ratio_clip, s.penalised, s.temperature) == (
        0.5, "student_mean", 256, 0.0, 2.0, False, 0.7)
    p = parse_loss_params("amm", {"adversary_class": "bounded", "returns": "to_go", "baseline": "none",
                                  "penalty_grad": "full", "pg_normalize": True})
    s = AMMSettings.from_params(p)
    assert s.cls == BoundedClass() and isinstance(s.estimator, ReturnsToGo)
    assert isinstance(s.estimator.baseline, NoBaseline) and s.penalised
    assert FullReturns.from_params(p) == FullReturns(NoBaseline(), True)


@pytest.mark.parametrize("adversary,kind", [("learned", LearnedAdversary), ("oracle", OracleAdversary)])
def test_the_objective_builds_the_named_adversary(adversary, kind):
    from learner.objective import AMMObjective
    obj = AMMObjective({"adversary": adversary, "head": "lowrank", "head_rank": 2}, hidden_size=4, vocab_size=5)
    assert isinstance(obj.adversary, kind) and obj.adversary.ascend.__self__ is obj.adversary
    assert all(isinstance(h, QHead) and h.cls is obj.cls for h in obj.heads)  # the oracle keeps its heads


def test_classes_and_heads_are_small_interfaces():
    with pytest.raises(TypeError):
        AdversaryClass()  # abstract
    z = torch.linspace(-3, 3, 7, dtype=torch.float64)
    assert torch.equal(BoundedClass().squash(z), torch.tanh(z)) and torch.equal(Chi2Class(2.0).squash(z), z)
    q, f = torch.softmax(z, -1)[None], z[None]
    assert float(Chi2Class(2.0).penalty(q, f)) == pytest.approx(float(2.0 * (q * f * f).sum()))
    gap = torch.tensor([0.3], dtype=torch.float64)
    assert torch.equal(BoundedClass().penalised(gap, z[None], f), gap)
    assert [k for k, h in HEADS.items() if h.reads_log_ratio] == ["logratio", "logratio_lowrank"]


def test_estimators_match_the_inline_formulas():
    g = torch.Generator().manual_seed(0)
    gap = torch.randn(4, 3, generator=g, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 1]], dtype=torch.bool)
    on = torch.tensor([True, True, False, True])
    w_on = mask / mask.sum(1, keepdim=True) * on[:, None] / 3
    x = CreditInputs(gap * mask, mask, on, w_on, 3.0)
    R = (gap * mask).sum(1) / mask.sum(1)
    loo = torch.stack([(R[on].sum() - R[i] * on[i]) / 2 for i in range(4)])
    want = (on[:, None] & mask) * (R - loo)[:, None] / 3.0
    torch.testing.assert_close(FullReturns().credit(x), want, atol=1e-15, rtol=0)
    torch.testing.assert_close(FullReturns(NoBaseline()).credit(x), (on[:, None] & mask) * R[:, None] / 3.0,
                               atol=1e-15, rtol=0)
    G = returns_to_go(gap * mask, mask)
    torch.testing.assert_close(ReturnsToGo(NoBaseline()).credit(x), w_on * G, atol=1e-15, rtol=0)
    torch.testing.assert_close(ReturnsToGo().credit(x), w_on * (G - baseline(G, mask, on, "loo")), atol=1e-15,
                               rtol=0)
    assert torch.equal(LeaveOneOut().of_returns(R, torch.tensor([True, False, False, False])), torch.zeros(4,
                       dtype=torch.float64))  # one on-policy row: nothing to leave out
