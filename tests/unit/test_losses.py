"""learner.losses against float64 brute-force references written in probability space."""
from __future__ import annotations

import math

import pytest
import torch

from learner.constants import TAIL_LOG_FLOOR
from learner.losses import LOSSES, get_loss, reference_loss
from learner.teacher_signal import TopKSignal, tail_logmass_from_topk

B, T, V = 2, 5, 11
DIVERGENCES = ["forward_kl", "reverse_kl", "generalized_jsd", "tv_distance",
               "skew_forward_kl", "skew_reverse_kl"]
# (name, params) cases for value/gradient checks.
CASES = [("forward_kl", {}), ("reverse_kl", {}), ("generalized_jsd", {}),
         ("generalized_jsd", {"beta": 0.1}), ("generalized_jsd", {"beta": 0.9}),
         ("tv_distance", {}), ("skew_forward_kl", {}), ("skew_forward_kl", {"alpha": 0.4}),
         ("skew_reverse_kl", {}), ("skew_reverse_kl", {"alpha": 0.4})]
CASE_IDS = [f"{n}-{'-'.join(f'{k}{v}' for k, v in p.items()) or 'default'}" for n, p in CASES]


# ----------------------------------------------------------------------------- references

def ref_divergence(name: str, p: torch.Tensor, q: torch.Tensor, **params) -> torch.Tensor:
    """Per-position divergence of probability vectors p (teacher), q (student) on the last axis."""
    def kl(a, b):
        return (a * torch.log(a / b)).sum(-1)
    if name == "forward_kl":
        return kl(p, q)
    if name == "reverse_kl":
        return kl(q, p)
    if name == "generalized_jsd":
        beta = params.get("beta", 0.5)
        m = beta * p + (1 - beta) * q
        return beta * kl(p, m) + (1 - beta) * kl(q, m)
    if name == "tv_distance":
        return 0.5 * (p - q).abs().sum(-1)
    if name == "skew_forward_kl":
        alpha = params.get("alpha", 0.1)
        return kl(p, alpha * p + (1 - alpha) * q)
    if name == "skew_reverse_kl":
        alpha = params.get("alpha", 0.1)
        return kl(q, (1 - alpha) * p + alpha * q)
    raise KeyError(name)


def softmax64(x: torch.Tensor) -> torch.Tensor:
    e = torch.exp(x.double())
    return e / e.sum(-1, keepdim=True)


def masked_mean(per_pos: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return per_pos[mask].sum() / mask.sum()


def ref_full(name, student, teacher, mask, **params):
    return masked_mean(ref_divergence(name, softmax64(teacher), softmax64(student), **params), mask)


def ref_buckets(name, student, sig: TopKSignal, mask, **params):
    """Brute force on the k+1 buckets (teacher top-k ids + one tail), no padded slots."""
    q = softmax64(student)
    p_top = sig.logprobs.double().exp()
    q_top = q.gather(-1, sig.ids)
    p = torch.cat([p_top, 1 - p_top.sum(-1, keepdim=True)], -1)
    qb = torch.cat([q_top, 1 - q_top.sum(-1, keepdim=True)], -1)
    return masked_mean(ref_divergence(name, p, qb, **params), mask)


# ------------------------------------------------------------------------------- inputs

def make_inputs(seed=0, b=B, t=T, v=V, dtype=torch.float32, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    student = (scale * torch.randn(b, t, v, generator=g, dtype=torch.float64)).to(dtype)
    teacher = (scale * torch.randn(b, t, v, generator=g, dtype=torch.float64)).to(dtype)
    mask = torch.rand(b, t, generator=g) < 0.7
    mask[0, 0], mask[-1, -1] = True, False  # some True and some False for sure
    labels = torch.randint(0, v, (b, t), generator=g)
    return student, teacher, mask, labels


def topk_signal(teacher: torch.Tensor, k: int, *, dtype=torch.float32, pad: int = 0,
                permute: bool = False, tail: str = "computed", seed: int = 0) -> TopKSignal:
    lp = torch.log_softmax(teacher.double(), -1)
    if permute:  # k == V in a random order per position
        g = torch.Generator().manual_seed(seed)
        ids = torch.argsort(torch.rand(lp.shape, generator=g), dim=-1)[..., :k]
        vals = lp.gather(-1, ids)
    else:
        vals, ids = lp.topk(k, dim=-1)
    tail_lm = {"computed": tail_logmass_from_topk(vals),
               "floor": torch.full(vals.shape[:-1], TAIL_LOG_FLOOR, dtype=torch.float64),
               "-inf": torch.full(vals.shape[:-1], -math.inf, dtype=torch.float64)}[tail]
    if pad:
        vals = torch.cat([vals, torch.full((*vals.shape[:-1], pad), -1e4, dtype=vals.dtype)], -1)
        ids = torch.cat([ids, torch.zeros((*ids.shape[:-1], pad), dtype=ids.dtype)], -1)
    return TopKSignal(ids, vals.to(dtype), tail_lm.to(dtype))


def value_and_grad(name, student, teacher, mask, **params):
    x = student.detach().clone().requires_grad_(True)
    out = get_loss(name).fn(x, teacher, mask, **params)
    (grad,) = torch.autograd.grad(out, x)
    return out.detach(), grad


def ref_value_and_grad(ref, name, student, teacher, mask, **params):
    x = student.detach().double().requires_grad_(True)
    out = ref(name, x, teacher, mask, **params)
    (grad,) = torch.autograd.grad(out, x)
    return out.detach(), grad


def assert_close(a, b, tol=1e-5):
    torch.testing.assert_close(a.double(), b.double(), atol=tol, rtol=0)


# ------------------------------------------------------------------------------- tests

@pytest.mark.parametrize("name,params", CASES, ids=CASE_IDS)
def test_full_logits_match_float64_reference(name, params):
    student, teacher, mask, _ = make_inputs(seed=1)
    val, grad = value_and_grad(name, student, teacher, mask, **params)
    rval, rgrad = ref_value_and_grad(ref_full, name, student, teacher, mask, **params)
    assert val.dtype == torch.float32
    assert_close(val, rval)
    assert_close(grad, rgrad)


def test_sft_matches_cross_entropy():
    student, _, mask, labels = make_inputs(seed=2)
    val, grad = value_and_grad("sft", student, None, mask, labels=labels)
    x = student.double().requires_grad_(True)
    ref = -torch.log(softmax64(x).gather(-1, labels[..., None])[..., 0])
    rval = masked_mean(ref, mask)
    (rgrad,) = torch.autograd.grad(rval, x)
    assert_close(val, rval)
    assert_close(grad, rgrad)
    assert get_loss("sft").needs_labels and not get_loss("forward_kl").needs_labels


@pytest.mark.parametrize("name", DIVERGENCES + ["sft"])
def test_gradcheck_full_logits(name):
    student, teacher, mask, labels = make_inputs(seed=3, b=1, t=4, v=5, dtype=torch.float64)
    extra = {"labels": labels} if name == "sft" else {}
    x = student.clone().requires_grad_(True)
    fn = get_loss(name).fn
    assert torch.autograd.gradcheck(lambda s: fn(s, teacher, mask, chunk_size=2, **extra), (x,))


@pytest.mark.parametrize("name", DIVERGENCES)
def test_gradcheck_topk(name):
    student, teacher, mask, _ = make_inputs(seed=4, b=1, t=4, v=6, dtype=torch.float64)
    sig = topk_signal(teacher, 3, dtype=torch.float64, pad=1)
    x = student.clone().requires_grad_(True)
    fn = get_loss(name).fn
    assert torch.autograd.gradcheck(lambda s: fn(s, sig, mask, chunk_size=2), (x,))


@pytest.mark.parametrize("tail", ["computed", "floor", "-inf"])
@pytest.mark.parametrize("name,params", CASES, ids=CASE_IDS)
def test_topk_with_k_equal_v_matches_full(name, params, tail):
    student, teacher, mask, _ = make_inputs(seed=5)
    sig = topk_signal(teacher, V, permute=True, tail=tail)
    val, grad = value_and_grad(name, student, sig, mask, **params)
    fval, fgrad = value_and_grad(name, student, teacher, mask, **params)
    assert torch.isfinite(val) and torch.isfinite(grad).all()
    assert_close(val, fval)
    assert_close(grad, fgrad)


@pytest.mark.parametrize("name,params", CASES, ids=CASE_IDS)
def test_topk_equals_bucket_divergence_and_lower_bounds_full(name, params):
    student, teacher, mask, _ = make_inputs(seed=6)
    sig = topk_signal(teacher, 4)
    val, grad = value_and_grad(name, student, sig, mask, **params)
    rval, rgrad = ref_value_and_grad(ref_buckets, name, student, sig, mask, **params)
    assert_close(val, rval)
    assert_close(grad, rgrad)
    # Data-processing inequality, per position: merging tokens cannot increase a divergence.
    q, p = softmax64(student), softmax64(teacher)
    qb = torch.cat([q.gather(-1, sig.ids), 1 - q.gather(-1, sig.ids).sum(-1, keepdim=True)], -1)
    pb = torch.cat([sig.logprobs.double().exp(), sig.tail_logmass.double().exp()[..., None]], -1)
    assert (ref_divergence(name, pb, qb, **params) <= ref_divergence(name, p, q, **params) + 1e-6).all()
    assert val <= ref_full(name, student, teacher, mask, **params) + 1e-6


@pytest.mark.parametrize("name", DIVERGENCES)
def test_padded_topk_slots_change_nothing(name):
    student, teacher, mask, _ = make_inputs(seed=7)
    # Make token 0 a real top-k id at some positions, so padding (id 0) collides with it.
    teacher[0, :3, 0] = 10.0
    plain = topk_signal(teacher, 4)
    padded = topk_signal(teacher, 4, pad=3)
    assert (plain.ids == 0).any() and (plain.ids != 0).all(-1).any()
    val, grad = value_and_grad(name, student, plain, mask)
    pval, pgrad = value_and_grad(name, student, padded, mask)
    assert_close(val, pval, tol=1e-6)
    assert_close(grad, pgrad, tol=1e-7)


def test_generalized_jsd_limits_and_symmetry():
    student, teacher, mask, _ = make_inputs(seed=8)
    fn = get_loss("generalized_jsd").fn
    sig = topk_signal(teacher, 4)
    for t in (teacher, sig):
        assert torch.equal(fn(student, t, mask, beta=0.0), get_loss("forward_kl").fn(student, t, mask))
        assert torch.equal(fn(student, t, mask, beta=1.0), get_loss("reverse_kl").fn(student, t, mask))
    for beta in (1e-3, 0.2, 0.5, 0.7, 1 - 1e-3):
        val = fn(student, teacher, mask, beta=beta)
        # 0 < JSD_beta <= H(beta) = -beta log beta - (1-beta) log(1-beta)
        bound = -beta * math.log(beta) - (1 - beta) * math.log(1 - beta)
        assert 0 < val.item() <= bound + 1e-6
        # Swapping the roles of p and q swaps beta and 1 - beta.
        swapped = fn(teacher, student, mask, beta=1 - beta)
        assert_close(val, swapped, tol=1e-6)
    assert_close(fn(student, teacher, mask, beta=0.5), fn(teacher, student, mask, beta=0.5), tol=1e-6)


def loss_inputs(name, topk, seed):
    """Student logits, the teacher (full or top-4), mask and the loss's extra kwargs."""
    student, teacher, mask, labels = make_inputs(seed=seed)
    return (student, topk_signal(teacher, 4) if topk else teacher, mask,
            {"labels": labels} if name == "sft" else {})


@pytest.mark.parametrize("name", DIVERGENCES + ["sft"])
@pytest.mark.parametrize("topk", [False, True], ids=["full", "topk"])
def test_chunk_size_and_naive_agree(name, topk):
    student, t, mask, extra = loss_inputs(name, topk, seed=9)
    v1, g1 = value_and_grad(name, student, t, mask, chunk_size=1024, **extra)
    v3, g3 = value_and_grad(name, student, t, mask, chunk_size=3, **extra)
    vn, gn = value_and_grad(name, student, t, mask, naive=True, **extra)
    assert_close(v1, v3, tol=1e-6)
    assert_close(g1, g3, tol=1e-6)  # float32 sums in another order: a few ulps apart
    assert_close(v1, vn, tol=1e-6)
    assert_close(g1, gn, tol=1e-6)
    assert_close(reference_loss(name, student, t, mask, **extra), v1, tol=1e-6)


@pytest.mark.parametrize("name", DIVERGENCES + ["sft"])
@pytest.mark.parametrize("topk", [False, True], ids=["full", "topk"])
def test_empty_mask_is_zero_with_a_gradient(name, topk):
    student, t, mask, extra = loss_inputs(name, topk, seed=10)
    x = student.clone().requires_grad_(True)
    out = get_loss(name).fn(x, t, torch.zeros_like(mask), **extra)
    assert out.item() == 0.0
    out.backward()
    assert x.grad is not None and torch.equal(x.grad, torch.zeros_like(x))


@pytest.mark.parametrize("name", DIVERGENCES)
def test_zero_iff_student_equals_teacher(name):
    student, teacher, mask, _ = make_inputs(seed=11)
    fn = get_loss(name).fn
    assert abs(fn(teacher, teacher.clone(), mask).item()) < 1e-6
    assert fn(student, teacher, mask).item() > 1e-3
    # Top-k: zero when the student matches the teacher, positive otherwise.
    sig = topk_signal(teacher, 4, pad=2)
    assert abs(fn(teacher, sig, mask).item()) < 1e-6
    assert fn(student, sig, mask).item() > 1e-3


def test_low_precision_input_and_degenerate_tail():
    student, teacher, mask, _ = make_inputs(seed=12)
    x = student.to(torch.bfloat16).requires_grad_(True)
    out = get_loss("generalized_jsd").fn(x, topk_signal(teacher, 4, dtype=torch.bfloat16), mask)
    out.backward()
    assert out.dtype == torch.float32 and torch.isfinite(out)
    assert x.grad.dtype == torch.bfloat16 and torch.isfinite(x.grad.float()).all()
    # A teacher tail of -inf with k < V is floored: large but finite, no NaN gradient.
    sig = topk_signal(teacher, 4, tail="-inf")
    for name in DIVERGENCES:
        val, grad = value_and_grad(name, student, sig, mask)
        assert torch.isfinite(val) and torch.isfinite(grad).all()
    with torch.no_grad():
        assert torch.isfinite(get_loss("reverse_kl").fn(student, teacher, mask))


def test_chunking_keeps_no_full_size_intermediates():
    """Autograd keeps one tensor for the chunked loss (its gradient); naive keeps several [N, V]."""
    student, teacher, mask, _ = make_inputs(seed=13, b=4, t=16, v=64)
    n = int(mask.sum())

    def saved_float_tensors(**kw):
        saved = []

        def pack(t):
            if t.is_floating_point():
                saved.append((t.numel(), t.untyped_storage().data_ptr()))
            return t
        x = student.clone().requires_grad_(True)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = get_loss("generalized_jsd").fn(x, teacher, mask, **kw)
        out.backward()
        return saved
    chunked = saved_float_tensors(chunk_size=8)
    # Inside a chunk autograd saves [chunk, V] pieces (freed with the chunk); the one tensor
    # kept for the backward pass is the gradient buffer, shaped like the logits.
    big = [numel for numel, _ in chunked if numel > 8 * 64]
    assert big == [student.numel()]
    naive = saved_float_tensors(naive=True)
    assert len({ptr for numel, ptr in naive if numel == n * 64}) >= 3
