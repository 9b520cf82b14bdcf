"""AMM's adversary heads that do not grow as hidden x V (issue #13), in float64 where maths
is checked:

- at hidden 2048 and a 128k vocabulary the low-rank heads hold under 5% of a linear head's
  hidden x V parameters (counted on the meta device, nothing allocated);
- on a tabular problem (one-hot states) ``adversary_step`` trains them to the analytic best
  response's value, chi2 and bounded, as the ``logratio`` head does; a low-rank head
  without the log-ratio feature falls short when its rank is below the problem's;
- ``head_rank`` is validated by name and reaches the heads, and the default head does not grow
  as hidden x V; the objective's state round-trips.
"""
import io

import pytest
import torch

from learner.amm import AMMSettings, GameInputs, _value_rows, adversary_step, log_ratio
from learner.amm_heads import HEADS, AdversaryClass, BoundedClass, Chi2Class, QHead, head_parameter_count
from learner.loss_params import AMMParams, parse_loss_params

V, N = 6, 5  # tokens, states


def rand(*shape, seed=0, scale=1.5):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64) * scale


@pytest.mark.parametrize("kind", ["lowrank", "logratio_lowrank"])
def test_low_rank_heads_are_under_5_percent_of_hidden_times_vocab(kind):
    hidden, vocab, rank = 2048, 131072, 64
    count = head_parameter_count(hidden, vocab, kind, rank)
    assert count == (hidden + vocab) * rank + vocab + (kind == "logratio_lowrank")
    assert count < 0.05 * hidden * vocab  # 8.65M against 268M
    assert head_parameter_count(hidden, vocab, "logratio") == hidden * vocab + vocab + 1


def tabular_value(kind: str, cls: AdversaryClass, rank: int, steps: int) -> tuple[float, float]:
    """(value reached by an off-policy head after ``steps`` ascents, the best response's value),
    the value being the mean over states of gap - penalty."""
    s, t = rand(1, N, V, seed=1), rand(1, N, V, seed=2)
    hidden = torch.eye(N, dtype=torch.float64)[None]  # tabular: a one-hot state
    mask, off = torch.ones(1, N, dtype=torch.bool), torch.tensor([False])
    torch.manual_seed(0)
    heads = tuple(QHead(N, V, kind, cls=cls, rank=rank).double() for _ in range(2))
    opt = torch.optim.Adam([p for h in heads for p in h.parameters()], lr=0.05)
    for _ in range(steps):
        adversary_step(heads, opt, GameInputs(s, t, mask, off, hidden), AMMSettings(beta=1.0, tail="student_mean"))
    ratio = log_ratio(s[0], t[0])
    with torch.no_grad():
        f = heads[1](hidden[0], ratio if heads[1].needs_log_ratio else None)
        reached = _value_rows(s[0], t[0], f, "student_mean", cls, True).mean()
        best = _value_rows(s[0], t[0], cls.best_response(ratio), "student_mean", cls, True).mean()
    return float(reached), float(best)


def test_chi2_low_rank_heads_reach_the_best_response_as_logratio_does():
    cls = Chi2Class(0.5)
    current, best = tabular_value("logratio", cls, 64, 200)
    assert current == pytest.approx(best, rel=1e-3)
    # The feature reaches (p/q - 1)/(2 lam) at rank 2 < N; alone, a low rank needs r >= N.
    assert tabular_value("logratio_lowrank", cls, 2, 200)[0] == pytest.approx(best, rel=1e-3)
    assert tabular_value("lowrank", cls, N, 200)[0] == pytest.approx(best, rel=1e-3)
    assert tabular_value("lowrank", cls, 2, 200)[0] < 0.9 * best


def test_bounded_low_rank_heads_reach_the_l1_distance_as_logratio_does():
    """tanh only approaches sign(p - q): the value tends to sum |p - q| from below."""
    cls = BoundedClass()
    current, best = tabular_value("logratio", cls, 64, 300)
    new, _ = tabular_value("logratio_lowrank", cls, 2, 300)
    assert current >= 0.99 * best and new >= 0.99 * best
    assert abs(new - current) <= 0.01 * best
    assert tabular_value("lowrank", cls, N, 300)[0] >= 0.9 * best


def test_head_rank_is_validated_by_name_and_reaches_the_heads():
    from learner.objective import AMMObjective

    for bad in (0, -1, 2.5, "8", True):
        with pytest.raises(ValueError, match="loss.params.head_rank"):
            parse_loss_params("amm", {"head_rank": bad})
    # The default head fits a real vocabulary: at hidden 2048 and V = 128256 (Llama 3) each of
    # the default objective's heads holds (hidden + V) r + V + 1 parameters, not hidden x V.
    hidden, vocab = 2048, 128256
    with torch.device("meta"):
        default = AMMObjective({}, hidden_size=hidden, vocab_size=vocab, device="meta")
    per_head = [sum(p.numel() for p in h.parameters()) for h in default.heads]
    rank = AMMParams().head_rank
    assert per_head == [(hidden + vocab) * rank + vocab + 1] * 2 and per_head[0] < 0.05 * hidden * vocab
    obj = AMMObjective({"head": "lowrank", "head_rank": 3}, hidden_size=8, vocab_size=V)
    assert [m.out_features for h in obj.heads for m in h.net if isinstance(m, torch.nn.Linear)] == [3, V, 3, V]
    with pytest.raises(ValueError, match="log-ratio"):
        QHead(8, V, "logratio_lowrank", rank=3)(torch.zeros(2, 8))
    assert set(HEADS) >= {"linear", "mlp", "logratio", "lowrank", "logratio_lowrank"}


def test_low_rank_head_starts_at_zero():
    head = QHead(8, V, "logratio_lowrank", cls=Chi2Class(), rank=3).double()
    h, ratio = rand(4, 8, seed=3), torch.zeros(4, V, dtype=torch.float64)
    assert head(h, ratio).abs().max() == 0  # W2 = 0, b = 0, and feature(0) = 0


def test_objective_state_round_trip_with_a_low_rank_head():
    from tests.unit.test_amm_classes import _objective_inputs
    from learner.objective import AMMObjective

    params = {"head": "logratio_lowrank", "head_rank": 4, "adversary_class": "chi2"}
    out, batch, hidden = _objective_inputs()
    torch.manual_seed(0)
    trained = AMMObjective(params, hidden_size=hidden, vocab_size=V, steps=5)
    for _ in range(3):
        trained.loss(out, batch)
        trained.after_student_step(out, batch)
    buf = io.BytesIO()  # through bytes, as a checkpoint is (in process the optimiser's state aliases)
    torch.save(trained.state_dict(), buf)
    state = torch.load(io.BytesIO(buf.getvalue()), weights_only=False)
    torch.manual_seed(1)
    restored = AMMObjective(params, hidden_size=hidden, vocab_size=V, steps=5)
    restored.load_state_dict(state)
    for a, b in zip(trained.heads, restored.heads):
        for (na, pa), (nb, pb) in zip(a.state_dict().items(), b.state_dict().items()):
            assert na == nb and torch.equal(pa, pb)
    (la, ma), (lb, mb) = trained.loss(out, batch), restored.loss(out, batch)  # same next step
    assert float(la.detach()) == float(lb.detach()) and ma == mb
    with pytest.raises(RuntimeError):  # a checkpoint of another head kind does not load silently
        AMMObjective({**params, "head": "logratio"}, hidden_size=hidden, vocab_size=V).load_state_dict(state)
