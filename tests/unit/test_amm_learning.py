"""AMM's adversaries have to learn (issue 23 item 2), in float64:

- every head kind, in both classes, starts far from its class's best response (at the start
  its value is under a tenth of the best response's), so the game is played, not given;
- a learned head closes the gap over its ascent steps (the value rises to the best response's);
- a restricted class, a linear head on the student's hidden state with no log p/q input and
  fewer features than states, reaches its own in-class optimum (a closed form, per token a
  weighted least-squares solve) and no further. There the student's gradient is not forward
  KL's, while at the unrestricted best response it is: the restricted class matches moments
  instead of renaming a divergence.
"""
import pytest
import torch

from learner.amm import AMMSettings, GameInputs, StudentInputs, _value_rows, adversary_step, log_ratio, student_loss
from learner.amm_heads import HEADS, BoundedClass, Chi2Class, QHead

V, N, H = 6, 8, 3  # tokens, states, hidden features (H + 1 < N: the linear class is restricted)


def rand(*shape, seed=0, scale=1.5):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64) * scale


def game(hidden: torch.Tensor):
    """One off-policy row of N states: student logits s, teacher logits t (neither one-hot)."""
    s, t = rand(1, N, V, seed=1), rand(1, N, V, seed=2)
    return GameInputs(s, t, torch.ones(1, N, dtype=torch.bool), torch.tensor([False]), hidden)


def value(cls, g: GameInputs, f: torch.Tensor) -> float:
    """The game's value, mean over states of gap - penalty, at values f [N, V]."""
    return float(_value_rows(g.student_logits[0], g.teacher[0], f, "student_mean", cls, True).mean())


def best_value(cls, g: GameInputs) -> float:
    return value(cls, g, cls.best_response(log_ratio(g.student_logits[0], g.teacher[0])))


def head_values(head: QHead, g: GameInputs) -> torch.Tensor:
    with torch.no_grad():
        ratio = log_ratio(g.student_logits[0], g.teacher[0]) if head.needs_log_ratio else None
        return head(g.hidden[0], ratio)


def ascend(kind: str, cls, g: GameInputs, steps: int, hidden: int, lr: float = 0.05) -> tuple[QHead, list[float]]:
    """An off-policy head trained ``steps`` ascents; its value after every step (step 0 first)."""
    torch.manual_seed(0)
    heads = tuple(QHead(hidden, V, kind, cls=cls, rank=2).double() for _ in range(2))
    opt = torch.optim.Adam([p for h in heads for p in h.parameters()], lr=lr)
    values = [value(cls, g, head_values(heads[1], g))]
    for _ in range(steps):
        adversary_step(heads, opt, g, AMMSettings(beta=1.0, tail="student_mean"))
        values.append(value(cls, g, head_values(heads[1], g)))
    return heads[1], values


@pytest.mark.parametrize("cls", [Chi2Class(0.5), BoundedClass()], ids=["chi2", "bounded"])
@pytest.mark.parametrize("kind", sorted(HEADS))
def test_every_head_starts_far_from_its_best_response(kind, cls):
    g = game(rand(1, N, H, seed=3))
    _, values = ascend(kind, cls, g, 0, H)
    best = best_value(cls, g)
    assert best > 0.05
    assert abs(values[0]) < 0.1 * best


def test_a_learned_head_closes_the_gap_to_the_best_response():
    cls = Chi2Class(0.5)
    g = game(torch.eye(N, dtype=torch.float64)[None])
    _, values = ascend("logratio", cls, g, 300, N)
    best = best_value(cls, g)
    assert values[0] < 0.1 * best
    assert values[10] < values[50] < values[300]  # the curve rises...
    assert values[300] == pytest.approx(best, rel=1e-3)  # ...to the best response
    assert max(values) <= best + 1e-9  # and never past it: the best response is the maximum


def restricted_optimum(g: GameInputs, lam: float) -> torch.Tensor:
    """[N, V] argmax of the chi2 value over f = W h + b, in closed form.

    Per token a, with x_s = [h_s, 1] and theta_a its row of [W, b], the value is the concave
    quadratic sum_s (p - q)_sa theta_a.x_s - lam q_sa (theta_a.x_s)^2, whose maximiser solves
    (2 lam sum_s q_sa x_s x_s^T) theta_a = sum_s (p - q)_sa x_s.
    """
    p, q = torch.softmax(g.teacher[0], -1), torch.softmax(g.student_logits[0], -1)
    x = torch.cat([g.hidden[0], torch.ones(N, 1, dtype=torch.float64)], -1)  # [N, H + 1]
    theta = torch.stack([torch.linalg.solve(2 * lam * (x.T * q[:, a]) @ x, x.T @ (p - q)[:, a])
                         for a in range(V)])  # [V, H + 1]
    return x @ theta.T


def student_gradient(g: GameInputs, f: torch.Tensor, lam: float) -> torch.Tensor:
    x = g.student_logits.clone().requires_grad_(True)
    batch = StudentInputs(torch.zeros(1, N, dtype=torch.long), g.mask, g.is_on_policy,
                          torch.zeros(1, N, dtype=torch.float64))
    loss, _ = student_loss(x, g.teacher, f[None], batch, AMMSettings(beta=1.0, cls=Chi2Class(lam)))
    return torch.autograd.grad(loss, x)[0][0]


def test_a_restricted_head_matches_moments_not_forward_kl():
    lam = 0.5
    cls, g = Chi2Class(lam), game(rand(1, N, H, seed=3))
    optimum = restricted_optimum(g, lam)
    head, values = ascend("linear", cls, g, 3000, H, lr=0.02)
    assert values[-1] == pytest.approx(value(cls, g, optimum), rel=1e-3)  # the head finds its class's optimum
    assert max(values) <= value(cls, g, optimum) + 1e-9                  # and nothing beyond it
    assert value(cls, g, optimum) < 0.9 * best_value(cls, g)             # the class is a real restriction
    p, q = torch.softmax(g.teacher[0], -1), torch.softmax(g.student_logits[0], -1)
    fkl = (q - p) / N  # forward KL's gradient, 1/|y| per position
    oracle = cls.best_response(log_ratio(g.student_logits[0], g.teacher[0]))
    torch.testing.assert_close(student_gradient(g, oracle, lam), fkl, atol=1e-12, rtol=0)
    restricted = student_gradient(g, optimum, lam)
    assert (restricted - fkl).norm() > 0.2 * fkl.norm()
    # It still points downhill on forward KL: a matched moment moves the student towards p.
    assert float((restricted * fkl).sum()) > 0
