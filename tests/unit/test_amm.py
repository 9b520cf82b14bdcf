"""AMM maths: the moment gap's properties, the adversary's reach, and the student's gradient
estimator against the exact gradient on a problem small enough to enumerate."""
import itertools

import pytest
import torch

from learner.amm import (AMMSettings, GameInputs, QHead, StudentInputs, adversary_step, moment_gap, returns_to_go,
                         baseline, student_loss)
from learner.amm_returns import BASELINES, RETURNS, ReturnsToGo
from learner.constants import TAIL_LOG_FLOOR
from learner.teacher_signal import TopKSignal, tail_logmass_from_topk


def topk_of(teacher_logits, k):
    lp = torch.log_softmax(teacher_logits.double(), -1)
    vals, ids = lp.topk(k, dim=-1)
    tail = tail_logmass_from_topk(vals).clamp(min=TAIL_LOG_FLOOR)
    return TopKSignal(ids, vals.to(teacher_logits.dtype), tail.to(teacher_logits.dtype))


def rand(*shape, seed=0, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64) * scale


@pytest.mark.parametrize("k", [None, 3, 11])
def test_gap_is_zero_when_student_equals_teacher(k):
    logits = rand(2, 5, 11)
    teacher = logits if k is None else topk_of(logits, k)
    f = torch.tanh(rand(2, 5, 11, seed=1))
    gap = moment_gap(logits, teacher, f, torch.ones(2, 5, dtype=torch.bool))
    assert gap.abs().max() < 1e-12


def test_gap_with_sign_adversary_is_the_l1_distance():
    s, t = rand(3, 4, 9, seed=2), rand(3, 4, 9, seed=3)
    p, q = torch.softmax(t, -1), torch.softmax(s, -1)
    gap = moment_gap(s, t, torch.sign(p - q), torch.ones(3, 4, dtype=torch.bool))
    torch.testing.assert_close(gap, (p - q).abs().sum(-1), atol=1e-12, rtol=0)


def test_topk_gap_matches_full_at_k_equal_v_and_brute_force_below():
    s, t = rand(2, 6, 7, seed=4), rand(2, 6, 7, seed=5)
    f = torch.tanh(rand(2, 6, 7, seed=6))
    mask = torch.ones(2, 6, dtype=torch.bool)
    full = moment_gap(s, t, f, mask)
    torch.testing.assert_close(moment_gap(s, topk_of(t, 7), f, mask), full, atol=1e-10, rtol=0)
    # k = 3: the top-k part exactly, the tail as its mass times the q-weighted mean of f there.
    sig = topk_of(t, 3)
    p, q = torch.softmax(t, -1), torch.softmax(s, -1)
    in_top = torch.zeros_like(p, dtype=torch.bool).scatter_(-1, sig.ids, True)
    tail_mean = (q * f * ~in_top).sum(-1) / (q * ~in_top).sum(-1)
    want = (p * f * in_top).sum(-1) + (p * ~in_top).sum(-1) * tail_mean - (q * f).sum(-1)
    torch.testing.assert_close(moment_gap(s, sig, f, mask), want, atol=1e-10, rtol=0)
    zero_tail = (p * f * in_top).sum(-1) - (q * f).sum(-1)
    torch.testing.assert_close(moment_gap(s, sig, f, mask, tail="zero"), zero_tail, atol=1e-10, rtol=0)


def test_gap_is_zero_off_the_mask():
    s, t = rand(2, 4, 5), rand(2, 4, 5, seed=1)
    mask = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0]], dtype=torch.bool)
    gap = moment_gap(s, t, torch.ones(2, 4, 5), mask)
    assert (gap[~mask] == 0).all()


def test_trained_adversary_reaches_98_percent_of_l1():
    torch.manual_seed(0)
    n, hidden, v = 8, 32, 11
    s, t = rand(1, n, v, seed=7).float(), rand(1, n, v, seed=8).float()
    h = torch.randn(1, n, hidden)
    mask = torch.ones(1, n, dtype=torch.bool)
    on = torch.tensor([True])
    heads = (QHead(hidden, v), QHead(hidden, v))
    opt = torch.optim.Adam([p for hd in heads for p in hd.parameters()], lr=0.05)
    for _ in range(400):
        adversary_step(heads, opt, GameInputs(s, t, mask, on, h), AMMSettings(beta=0.0, tail="student_mean"))
    l1 = (torch.softmax(t, -1) - torch.softmax(s, -1)).abs().sum(-1).mean()
    reached = moment_gap(s, t, heads[0](h), mask).mean()
    assert reached >= 0.98 * l1, (float(reached), float(l1))


def test_returns_to_go_and_leave_one_out_baseline():
    gap = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)
    G = returns_to_go(gap, mask)
    torch.testing.assert_close(G, torch.tensor([[5.0, 3.0, 0.0], [5.0, 0.0, 0.0]], dtype=torch.float64))
    b = baseline(G, mask, torch.tensor([True, True]), "loo")
    # Position 0: each row's baseline is the other row's G; position 2 has one row: baseline 0.
    torch.testing.assert_close(b[:, 0], torch.tensor([5.0, 5.0], dtype=torch.float64))
    assert b[0, 2] == 0


# --------------------------------------------------------------- the tabular problem
V, T = 3, 3
PREFIXES = [p for n in range(T) for p in itertools.product(range(V), repeat=n)]
STATE = {p: i for i, p in enumerate(PREFIXES)}


EOS = 2  # in the variable-length problem, token 2 ends a response


def fixed_length_responses():
    return list(itertools.product(range(V), repeat=T))


def eos_responses():
    """Every response of at most T tokens that stops at its first EOS."""
    return [y for n in range(1, T + 1) for y in itertools.product(range(V), repeat=n)
            if EOS not in y[:-1] and (n == T or y[-1] == EOS)]


def tabular_problem(seed):
    """Student logits, teacher logits and adversary values per state (prefix)."""
    g = torch.Generator().manual_seed(seed)
    theta0 = torch.randn(len(PREFIXES), V, generator=g, dtype=torch.float64)
    teacher = torch.randn(len(PREFIXES), V, generator=g, dtype=torch.float64) * 2
    f = torch.tanh(torch.randn(len(PREFIXES), V, generator=g, dtype=torch.float64) * 2)
    return theta0, teacher, f, g


def exact_d_on(theta, teacher, f, responses):
    """D_on(theta) = sum_y pi(y) 1/|y| sum_t g(s_t), by enumerating every response."""
    q, p = torch.softmax(theta, -1), torch.softmax(teacher, -1)
    g = ((p - q) * f).sum(-1)  # per state
    total = 0
    for y in responses:
        ids = [STATE[y[:t]] for t in range(len(y))]
        prob = torch.stack([q[ids[t], y[t]] for t in range(len(y))]).prod()
        total = total + prob * g[ids].mean()
    return total


def padded(ys):
    ids = torch.zeros(len(ys), T, dtype=torch.long)
    mask = torch.zeros(len(ys), T, dtype=torch.bool)
    for i, y in enumerate(ys):
        ids[i, :len(y)] = torch.tensor(y)
        mask[i, :len(y)] = True
    states = torch.tensor([[STATE[tuple(y[:t])] if t < len(y) else 0 for t in range(T)] for y in ys])
    return ids, mask, states


def mc_gradient(theta0, teacher, f, responses, batches, gen, returns, baseline_kind="loo"):
    """Mean and standard error of the student-loss gradient over batches of 64 sampled responses."""
    ids, mask, states = padded(responses)
    probs = torch.softmax(theta0, -1)[states, ids].where(mask, torch.ones(())).prod(-1)
    grads = []
    for _ in range(batches):
        pick = torch.multinomial(probs, 64, replacement=True, generator=gen)
        th = theta0.clone().requires_grad_(True)
        y, m, s = ids[pick], mask[pick], states[pick]
        behavior = torch.log_softmax(theta0[s], -1).gather(2, y[..., None])[..., 0]
        batch = StudentInputs(y, m, torch.ones(64, dtype=torch.bool), behavior)
        estimator = RETURNS[returns](BASELINES[baseline_kind]())
        loss, _ = student_loss(th[s], teacher[s], f[s], batch, AMMSettings(beta=0.0, estimator=estimator, chunk_size=50))
        grads.append(torch.autograd.grad(loss, th)[0])
    grads = torch.stack(grads)
    return grads.mean(0), grads.std(0) / len(grads) ** 0.5


@pytest.mark.parametrize("baseline_kind,returns", [("none", "to_go"), ("loo", "to_go"), ("loo", "full")])
def test_on_policy_gradient_estimator_is_unbiased(baseline_kind, returns):
    theta0, teacher, f, g = tabular_problem(0)
    theta = theta0.clone().requires_grad_(True)
    exact = torch.autograd.grad(exact_d_on(theta, teacher, f, fixed_length_responses()), theta)[0]
    mean, se = mc_gradient(theta0, teacher, f, fixed_length_responses(), 200, g, returns, baseline_kind)
    assert ((mean - exact).abs() <= 4 * se + 1e-6).all(), (mean - exact).abs().max()
    # The estimator is not trivially zero: the exact gradient is far from 0 relative to the error.
    assert exact.abs().max() > 10 * se.max()


def test_off_policy_gradient_is_the_direct_gradient_of_d_off():
    s, t = rand(3, 4, 6, seed=11), rand(3, 4, 6, seed=12)
    f = torch.tanh(rand(3, 4, 6, seed=13))
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]], dtype=torch.bool)
    ids = torch.zeros(3, 4, dtype=torch.long)
    batch = StudentInputs(ids, mask, torch.zeros(3, dtype=torch.bool), torch.zeros(3, 4, dtype=torch.float64))
    x = s.clone().requires_grad_(True)
    loss, metrics = student_loss(x, t, f, batch, AMMSettings(beta=1.0, chunk_size=2))
    got = torch.autograd.grad(loss, x)[0]
    x2 = s.clone().requires_grad_(True)
    gap = moment_gap(x2, t, f, mask)
    d_off = (gap.sum(1) / mask.sum(1)).mean()
    want = torch.autograd.grad(d_off, x2)[0]
    torch.testing.assert_close(got, want, atol=1e-12, rtol=0)
    assert metrics["d_off"] == pytest.approx(float(d_off.detach()))


def test_student_surrogate_matches_a_naive_second_implementation():
    """Chunked surrogate (top-k teacher, mixed rows, old behaviour policy) vs plain autograd."""
    s, t = rand(3, 4, 6, seed=21), rand(3, 4, 6, seed=22)
    f = torch.tanh(rand(3, 4, 6, seed=23))
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)
    on = torch.tensor([True, True, False])
    ids = torch.tensor([[0, 3, 1, 5], [2, 4, 0, 0], [1, 1, 0, 0]])
    behavior = torch.log_softmax(rand(3, 4, 6, seed=24), -1).gather(2, ids[..., None])[..., 0]
    sig, beta = topk_of(t, 3), 0.3
    x = s.clone().requires_grad_(True)
    loss, _ = student_loss(x, sig, f, StudentInputs(ids, mask, on, behavior),
                           AMMSettings(beta, chunk_size=2, estimator=ReturnsToGo()))
    got = torch.autograd.grad(loss, x)[0]

    x2 = s.clone().requires_grad_(True)
    gap = moment_gap(x2, sig, f, mask)
    logq = torch.log_softmax(x2, -1).gather(2, ids[..., None])[..., 0]
    length = mask.sum(1, keepdim=True).double()
    w_direct = torch.where(on[:, None], torch.tensor((1 - beta) / 2, dtype=torch.float64), beta / 1) / length * mask
    G = torch.stack([torch.stack([(gap[i, j + 1:] * mask[i, j + 1:]).sum() for j in range(4)])
                     for i in range(3)]).detach()
    b = torch.zeros_like(G)  # leave-one-out over the two on-policy rows
    b[0], b[1] = G[1] * mask[1], G[0] * mask[0]
    ratio = (logq.detach() - behavior).exp().clamp(max=2.0)
    w_pg = torch.where(on[:, None], torch.tensor((1 - beta) / 2, dtype=torch.float64), 0.0) / length * ratio * (G - b) * mask
    want = torch.autograd.grad((w_direct * gap + w_pg * logq).sum(), x2)[0]
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-9)


def test_full_returns_are_unbiased_with_eos_and_to_go_is_not():
    theta0, teacher, f, g = tabular_problem(3)
    theta = theta0.clone().requires_grad_(True)
    exact = torch.autograd.grad(exact_d_on(theta, teacher, f, eos_responses()), theta)[0]
    mean, se = mc_gradient(theta0, teacher, f, eos_responses(), 300, g, "full")
    assert ((mean - exact).abs() <= 4 * se + 1e-6).all(), (mean - exact).abs().max()
    # Return-to-go treats 1/|y| as a constant: with EOS its mean misses the exact gradient.
    mean_tg, se_tg = mc_gradient(theta0, teacher, f, eos_responses(), 300, g, "to_go")
    assert ((mean_tg - exact).abs() > 6 * se_tg).any()


def test_chunked_adversary_step_and_callable_values_match_whole_batch():
    torch.manual_seed(1)
    s, t = rand(3, 5, 7, seed=31).float(), topk_of(rand(3, 5, 7, seed=32).float(), 3)
    h = torch.randn(3, 5, 16)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0]], dtype=torch.bool)
    on = torch.tensor([True, False, True])
    results = []
    for chunk in (2, 1000):
        torch.manual_seed(0)
        heads = (QHead(16, 7, "logratio"), QHead(16, 7, "logratio"))
        opt = torch.optim.Adam([p for hd in heads for p in hd.parameters()], lr=0.1)
        loss = adversary_step(heads, opt, GameInputs(s, t, mask, on, h), AMMSettings(0.4, "student_mean", chunk_size=chunk))
        results.append((loss, [p.detach().clone() for hd in heads for p in hd.parameters()]))
    assert results[0][0] == pytest.approx(results[1][0], abs=1e-6)
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    # The student loss with values given as a function of positions equals the tensor form.
    from learner.amm import adversary_values
    everywhere = mask.nonzero(as_tuple=True)
    full = torch.zeros(3, 5, 7)
    with torch.no_grad():
        full[everywhere] = adversary_values(heads, h, s, t, on, everywhere)
    batch = StudentInputs(torch.zeros(3, 5, dtype=torch.long), mask, on, torch.zeros(3, 5))
    x1, x2 = s.clone().requires_grad_(True), s.clone().requires_grad_(True)
    l1, _ = student_loss(x1, t, full, batch, AMMSettings(0.4, chunk_size=3))
    l2, _ = student_loss(x2, t, lambda idx: adversary_values(heads, h, x2, t, on, idx), batch,
                         AMMSettings(0.4, chunk_size=3))
    torch.testing.assert_close(l1, l2)
    torch.testing.assert_close(torch.autograd.grad(l1, x1)[0], torch.autograd.grad(l2, x2)[0])
