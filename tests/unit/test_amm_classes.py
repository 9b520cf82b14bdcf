"""AMM's adversary classes, the oracle, and three correctness fixes, in float64.

- chi2: a learned head reaches the analytic best response (p/q - 1) / (2 lam) on a tabular
  problem (one-hot states), and at that optimum the student's gradient is the derived one,
  in both penalty forms;
- the oracle's values are the class's best response, and its distance is the closed form;
- a padded top-k slot never overwrites a real slot's log-ratio;
- rows split unevenly across ranks: the mean of the ranks' losses is the one-rank loss;
- at a sampling temperature T, fresh rows have an importance ratio of exactly 1.
"""
import pytest
import torch

from learner.amm import (AMMSettings, BoundedClass, Chi2Class, GameInputs, QHead, StudentInputs, adversary_step,
                         log_ratio, moment_gap, oracle_values, student_loss, true_distances)
from learner.amm_returns import FullReturns, NoBaseline
from learner.teacher_signal import TopKSignal

V = 6


def rand(*shape, seed=0, scale=1.5):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64) * scale


def off_policy(n_rows, n_pos):
    return StudentInputs(torch.zeros(n_rows, n_pos, dtype=torch.long), torch.ones(n_rows, n_pos, dtype=torch.bool),
                         torch.zeros(n_rows, dtype=torch.bool), torch.zeros(n_rows, n_pos, dtype=torch.float64))


def test_learned_chi2_head_reaches_the_analytic_best_response():
    lam = 0.5
    n = 5  # states, one row each position
    s, t = rand(1, n, V, seed=1), rand(1, n, V, seed=2)
    hidden = torch.eye(n, dtype=torch.float64)[None]  # tabular: a one-hot state
    cls = Chi2Class(lam)
    torch.manual_seed(0)
    heads = tuple(QHead(n, V, "linear", cls=cls).double() for _ in range(2))
    opt = torch.optim.Adam([p for h in heads for p in h.parameters()], lr=0.05)
    decay = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.999)  # settle onto the optimum
    mask, off = torch.ones(1, n, dtype=torch.bool), torch.tensor([False])
    for _ in range(4000):
        adversary_step(heads, opt, GameInputs(s, t, mask, off, hidden), AMMSettings(beta=1.0, tail="student_mean"))
        decay.step()
    p, q = torch.softmax(t, -1), torch.softmax(s, -1)
    best = (p / q - 1) / (2 * lam)
    torch.testing.assert_close(heads[1](hidden), best, atol=1e-8, rtol=0)
    torch.testing.assert_close(oracle_values(cls, s, t, (torch.zeros(n, dtype=torch.long), torch.arange(n)))[None],
                               best, atol=1e-12, rtol=0)


@pytest.mark.parametrize("penalty_grad", ["detached", "full"])
def test_student_gradient_at_the_chi2_optimum(penalty_grad):
    lam = 0.7
    s, t = rand(2, 3, V, seed=3), rand(2, 3, V, seed=4)
    p, q = torch.softmax(t, -1), torch.softmax(s, -1)
    best = (p / q - 1) / (2 * lam)
    x = s.clone().requires_grad_(True)
    loss, metrics = student_loss(x, t, best, off_policy(2, 3), AMMSettings(beta=1.0, cls=Chi2Class(lam),
                                                                          penalised=penalty_grad == "full"))
    got = torch.autograd.grad(loss, x)[0]
    weight = 1 / (2 * 3)  # 1/|y| per position, over 2 rows
    if penalty_grad == "detached":  # forward KL's direction
        want = (q - p) / (2 * lam)
    else:  # the gradient of chi^2(p || q) / (4 lam)
        r = (p * p / q).sum(-1, keepdim=True)
        want = -(p * p / q - q * r) / (4 * lam)
    torch.testing.assert_close(got, weight * want, atol=1e-12, rtol=0)
    chi2 = ((p - q) ** 2 / q).sum(-1).mean() / (4 * lam)  # the value of the game at the optimum
    assert metrics["d_off"] == pytest.approx(float(chi2), rel=1e-10)


def test_oracle_bounded_values_and_true_distances():
    s, t = rand(2, 4, V, seed=5), rand(2, 4, V, seed=6)
    p, q = torch.softmax(t, -1), torch.softmax(s, -1)
    mask, on = torch.ones(2, 4, dtype=torch.bool), torch.tensor([True, False])
    rows, cols = mask.nonzero(as_tuple=True)
    f = oracle_values(BoundedClass(), s, t, (rows, cols)).reshape(2, 4, V)
    torch.testing.assert_close(f, torch.sign(p - q))
    l1 = (p - q).abs().sum(-1).mean(-1)
    got = true_distances(GameInputs(s, t, mask, on), AMMSettings(0.5, "student_mean", cls=BoundedClass()))
    assert got["d_on_true"] == pytest.approx(float(l1[0])) and got["d_off_true"] == pytest.approx(float(l1[1]))
    lam = 2.0
    chi = true_distances(GameInputs(s, t, mask, on), AMMSettings(0.5, "student_mean", cls=Chi2Class(lam)))
    want = ((p - q) ** 2 / q).sum(-1).mean(-1) / (4 * lam)
    assert chi["d_on_true"] == pytest.approx(float(want[0]))


@pytest.mark.parametrize("cls, bound", [(Chi2Class(1.0), 10.0), (BoundedClass(), 20.0)])
def test_log_ratio_clamped_counts_the_positions_where_the_clamp_binds(cls, bound):
    """Three of eight positions get one token with log p - log q about 2 past the class's clamp (and
    one more about 2 short of it): log_ratio_clamped is 3/8, where a count per token or per row,
    or a bound off by the margin, would say otherwise."""
    s, t = rand(2, 4, V, seed=11, scale=0.3), rand(2, 4, V, seed=12, scale=0.3)
    for (row, col), past in {(0, 1): True, (1, 0): True, (1, 3): True, (0, 2): False}.items():
        s[row, col, 2] -= bound + (2.0 if past else -2.0)  # the ratio there moves by about bound +- 2
    ratio = log_ratio(s, t)
    assert int((ratio > bound).any(-1).sum()) == 3  # the fixture does what it says
    mask, on = torch.ones(2, 4, dtype=torch.bool), torch.tensor([True, False])
    got = true_distances(GameInputs(s, t, mask, on), AMMSettings(0.5, "student_mean", cls=cls))
    assert got["log_ratio_clamped"] == pytest.approx(3 / 8)
    assert true_distances(GameInputs(s, t, mask, on), AMMSettings(0.5, "student_mean", cls=cls)) == got


def test_a_padded_topk_slot_never_overwrites_the_last_token():
    v = 5
    s = rand(1, v, seed=7)
    # Token v-1 is a real top-k slot; the padded slot (logprob -inf-like, id 0) must not race it.
    ids = torch.tensor([[v - 1, 2, 0]])
    logprobs = torch.tensor([[-0.5, -1.5, -1e9]], dtype=torch.float64)
    tail = torch.tensor([-1.2], dtype=torch.float64)
    got = log_ratio(s, TopKSignal(ids, logprobs, tail))
    logq = torch.log_softmax(s, -1)
    assert float(got[0, v - 1]) == pytest.approx(float(-0.5 - logq[0, v - 1]))
    assert float(got[0, 2]) == pytest.approx(float(-1.5 - logq[0, 2]))
    # A row with no real slot at all: every token gets the tail's ratio.
    empty = log_ratio(s, TopKSignal(torch.zeros(1, 3, dtype=torch.long), torch.full((1, 3), -1e9, dtype=torch.float64),
                                    torch.zeros(1, dtype=torch.float64)))
    torch.testing.assert_close(empty, (0 - torch.logsumexp(logq, -1, keepdim=True)).expand(1, v))


def test_uneven_rank_split_matches_the_single_rank_loss():
    """Five rows (three on-policy) over two ranks: the ranks' mean loss is the whole batch's."""
    n, T = 5, 3
    s, t = rand(n, T, V, seed=8), rand(n, T, V, seed=9)
    f = torch.tanh(rand(n, T, V, seed=10))
    on = torch.tensor([True, True, False, True, False])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 1, 0]], dtype=torch.bool)
    ids = torch.randint(0, V, (n, T), generator=torch.Generator().manual_seed(0))
    lp = torch.log_softmax(s, -1).gather(-1, ids[..., None])[..., 0]

    def loss(rows, totals=None):
        batch = StudentInputs(ids[rows], mask[rows], on[rows], lp[rows], totals)
        x = s[rows].clone().requires_grad_(True)
        value, _ = student_loss(x, t[rows], f[rows], batch, AMMSettings(beta=0.5, estimator=FullReturns(NoBaseline())))
        return value
    whole = loss(list(range(n)))
    totals = (int(on.sum()), int((~on).sum()), 2)
    ranks = [loss([0, 2, 4], totals), loss([1, 3], totals)]
    assert float(sum(ranks) / 2) == pytest.approx(float(whole), rel=1e-12)
    old = [loss([0, 2, 4]), loss([1, 3])]  # each rank normalising by its own counts: not the same
    assert float(sum(old) / 2) != pytest.approx(float(whole), rel=1e-6)


@pytest.mark.parametrize("temperature", [0.7, 1.0, 1.3])
def test_fresh_rows_at_a_sampling_temperature_have_ratio_one(temperature):
    """The policy-gradient weight of a fresh row must not depend on the temperature through
    the importance ratio: behaviour log-probs are q_T's, so q_T / mu = 1 exactly."""
    s, t = rand(2, 3, V, seed=11), rand(2, 3, V, seed=12)
    f = torch.tanh(rand(2, 3, V, seed=13))
    ids = torch.randint(0, V, (2, 3), generator=torch.Generator().manual_seed(1))
    mu = torch.log_softmax(s / temperature, -1).gather(-1, ids[..., None])[..., 0]
    on, mask = torch.tensor([True, True]), torch.ones(2, 3, dtype=torch.bool)
    batch = StudentInputs(ids, mask, on, mu)
    x = s.clone().requires_grad_(True)
    loss, _ = student_loss(x, t, f, batch, AMMSettings(beta=0.0, ratio_clip=1.5, temperature=temperature,
                                                       estimator=FullReturns(NoBaseline())))
    got = torch.autograd.grad(loss, x)[0]
    # The same with a clip of 1 (ratio capped at 1): identical only if every ratio is exactly 1.
    x2 = s.clone().requires_grad_(True)
    loss2, _ = student_loss(x2, t, f, batch, AMMSettings(beta=0.0, ratio_clip=1.0, temperature=temperature,
                                                         estimator=FullReturns(NoBaseline())))
    torch.testing.assert_close(got, torch.autograd.grad(loss2, x2)[0], atol=1e-12, rtol=0)
    if temperature != 1.0:  # at T = 1 the learner's q is not the behaviour policy
        x3 = s.clone().requires_grad_(True)
        loss3, _ = student_loss(x3, t, f, batch, AMMSettings(beta=0.0, ratio_clip=1.5,
                                                             estimator=FullReturns(NoBaseline())))
        assert not torch.allclose(torch.autograd.grad(loss3, x3)[0], got)


def _objective_inputs(seed=0, n=4, T=3, P=2):
    """A forward pass's output and a LearnerBatch of two on- and two off-policy rows."""
    from types import SimpleNamespace

    from learner.batch import LearnerBatch
    g = torch.Generator().manual_seed(seed)
    hidden = 8
    ids = torch.randint(0, V, (n, P + T), generator=g)
    logits = torch.randn(n, P + T, V, generator=g, dtype=torch.float64, requires_grad=True)
    h = torch.randn(n, P + T, hidden, generator=g, dtype=torch.float64)
    t = torch.randn(n, T, V, generator=g, dtype=torch.float64)
    lp = torch.log_softmax(logits.detach()[:, P - 1:P - 1 + T], -1).gather(-1, ids[:, P:, None])[..., 0]
    batch = LearnerBatch(ids, torch.ones_like(ids), torch.arange(P + T).expand(n, -1), P, ids[:, P:],
                         torch.ones(n, T, dtype=torch.bool), lp, torch.tensor([True, True, False, False]),
                         torch.zeros(n), t)
    return SimpleNamespace(logits=logits, hidden_states=[h]), batch, hidden


def test_beta_schedule_anchor_and_adversary_warmup():
    from learner.losses import forward_kl
    from learner.objective import AMMObjective

    out, batch, hidden = _objective_inputs()
    sched = AMMObjective({"beta": 0.5, "beta_schedule": "linear", "beta_start": 1.0, "head": "linear"},
                         hidden_size=hidden, vocab_size=V, steps=5)
    betas = []
    for _ in range(5):
        betas.append(sched.beta())
        sched.after_student_step(out, batch)
    assert betas == pytest.approx([1.0, 0.875, 0.75, 0.625, 0.5])

    torch.manual_seed(0)
    plain = AMMObjective({"head": "linear"}, hidden_size=hidden, vocab_size=V, steps=5)
    torch.manual_seed(0)
    anchored = AMMObjective({"head": "linear", "anchor_fkl": 0.3}, hidden_size=hidden, vocab_size=V, steps=5)
    a, ma = plain.loss(out, batch)
    b, mb = anchored.loss(out, batch)
    fkl = forward_kl(batch.response_logits(out.logits), batch.teacher, batch.mask)
    assert float(b) == pytest.approx(float(a + 0.3 * fkl), rel=1e-10)
    assert mb["anchor_fkl"] == pytest.approx(float(fkl)) and "anchor_fkl" not in ma

    # Warm-up: the first step's adversaries have ascended adv_warmup_steps more times, which
    # shows as a larger learned distance than one ascent reaches; later steps take one.
    torch.manual_seed(0)
    warm = AMMObjective({"head": "linear", "adv_warmup_steps": 50, "adv_lr": 0.05}, hidden_size=hidden,
                        vocab_size=V, steps=5)
    _, mw = warm.loss(out, batch)
    assert mw["d_off"] > ma["d_off"] + 0.05
    assert mw["d_off"] <= mw["d_off_true"] + 1e-9  # a learned adversary never beats its class's best response


def test_default_amm_at_its_best_response_descends_forward_kl():
    """AMM's defaults (chi2 class, lambda 0.5, no policy-gradient term): at the adversary's best
    response the student's gradient is forward KL's on the same rows, on- and off-policy alike
    (BENCHMARKS.md, issue #12). The paper's settings (bounded class, policy gradient 0.2) are not."""
    from learner.losses import forward_kl
    from learner.objective import AMMObjective

    out, batch, hidden = _objective_inputs(seed=5)
    logits = batch.response_logits(out.logits)
    want = torch.autograd.grad(forward_kl(logits, batch.teacher, batch.mask), out.logits)[0]
    default = AMMObjective({"adversary": "oracle"}, hidden_size=hidden, vocab_size=V)
    got = torch.autograd.grad(default.loss(out, batch)[0], out.logits)[0]
    torch.testing.assert_close(got, want, atol=1e-12, rtol=0)
    for paper in ({"adversary_class": "bounded"}, {"pg_coef": 0.2}):
        other = AMMObjective({"adversary": "oracle", **paper}, hidden_size=hidden, vocab_size=V)
        assert not torch.allclose(torch.autograd.grad(other.loss(out, batch)[0], out.logits)[0], want)


def test_normalised_policy_gradient_does_not_follow_the_gaps_scale():
    """With pg_normalize, scaling the adversary by c scales the direct term by c and leaves the
    policy-gradient term as it was: G(c f) - D(c f) = G(f) - D(f), D the direct part alone."""
    s, t = rand(4, 3, V, seed=14), rand(4, 3, V, seed=15)
    f = torch.tanh(rand(4, 3, V, seed=16))
    ids = torch.randint(0, V, (4, 3), generator=torch.Generator().manual_seed(2))
    mu = torch.log_softmax(s, -1).gather(-1, ids[..., None])[..., 0]
    batch = StudentInputs(ids, torch.ones(4, 3, dtype=torch.bool), torch.ones(4, dtype=torch.bool), mu)

    def grad(values, pg_coef, normalize=True):
        x = s.clone().requires_grad_(True)
        loss, _ = student_loss(x, t, values, batch, AMMSettings(beta=0.0, pg_coef=pg_coef,
                                                             estimator=FullReturns(normalize=normalize)))
        return torch.autograd.grad(loss, x)[0]
    pg = grad(f, 1.0) - grad(f, 0.0)
    torch.testing.assert_close(grad(10 * f, 1.0) - grad(10 * f, 0.0), pg, atol=1e-7, rtol=0)  # eps 1e-8
    assert pg.abs().max() > 1e-4  # the term is there
    raw = grad(f, 1.0, False) - grad(f, 0.0, False)
    assert not torch.allclose(grad(10 * f, 1.0, False) - grad(10 * f, 0.0, False), raw)
