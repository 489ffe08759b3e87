"""The update kernels: against torch.optim's own AdamW/Adam, against closed forms, and against each other."""

import math

import pytest
import torch

from zeroadamw import functional as F

SHAPES = [(7, 3), (5,), (11, 13), (1,), (64, 17)]
HP = dict(lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8)


def make_state(shapes, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=g).to(dtype) for s in shapes]
    return params, [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params], [
        torch.zeros((), dtype=torch.float32) for _ in params
    ]


def grads_for(step, shapes, dtype=torch.float32):
    g = torch.Generator().manual_seed(100 + step)
    return [torch.randn(s, generator=g).to(dtype) for s in shapes]


@pytest.mark.parametrize(
    "impl,torch_kw",
    [("reference", dict(foreach=False)), ("foreach", dict(foreach=True)), ("fused", dict(fused=True))],
)
@pytest.mark.parametrize("decay,torch_cls", [("decoupled", torch.optim.AdamW), ("l2", torch.optim.Adam)])
def test_kernel_bit_identical_to_torch(impl, torch_kw, decay, torch_cls):
    """decoupled == torch.optim.AdamW, l2 == torch.optim.Adam(weight_decay) -- bit for bit, params and state, 30 steps."""
    params, m, v, steps = make_state(SHAPES)
    ref_params = [p.clone().requires_grad_() for p in params]
    ref = torch_cls(ref_params, lr=HP["lr"], betas=(HP["beta1"], HP["beta2"]), eps=HP["eps"], weight_decay=0.1, **torch_kw)
    for step in range(30):
        grads = grads_for(step, SHAPES)
        for q, g in zip(ref_params, grads):
            q.grad = g.clone()
        ref.step()
        F.adamw(params, grads, m, v, steps, weight_decay=0.1, decay=decay, impl=impl, **HP)
    for i, q in enumerate(ref_params):
        st = ref.state[q]
        assert torch.equal(params[i], q.detach())
        assert torch.equal(m[i], st["exp_avg"]) and torch.equal(v[i], st["exp_avg_sq"])
        assert float(steps[i]) == float(st["step"]) == 30


def test_fused_bf16_bit_identical_to_torch_fused():
    params, m, v, steps = make_state(SHAPES, dtype=torch.bfloat16)
    ref_params = [p.clone().requires_grad_() for p in params]
    ref = torch.optim.AdamW(ref_params, lr=HP["lr"], betas=(HP["beta1"], HP["beta2"]), weight_decay=0.1, fused=True)
    for step in range(20):
        grads = grads_for(step, SHAPES, torch.bfloat16)
        for q, g in zip(ref_params, grads):
            q.grad = g.clone()
        ref.step()
        F.adamw_fused(params, grads, m, v, steps, weight_decay=0.1, **HP)
    assert all(torch.equal(p, q.detach()) for p, q in zip(params, ref_params))


@pytest.mark.parametrize("decay", F.DECAY_MODES)
@pytest.mark.parametrize("impl", ["foreach", "fused"])
def test_fast_kernels_match_reference(decay, impl):
    """All three decay modes, with a changing lr and a grad_scale: foreach/fused == the readable loop (1e-6)."""
    p1, m1, v1, s1 = make_state(SHAPES)
    p2, m2, v2, s2 = make_state(SHAPES)
    for step in range(40):
        lr = 1e-2 * (0.5 + 0.5 * math.cos(math.pi * step / 40))  # a cosine schedule
        grads = [g * 8 for g in grads_for(step, SHAPES)]
        kw = dict(HP, lr=lr, weight_decay=0.05, decay=decay, lr_max=1e-2, grad_scale=8.0)
        F.adamw_reference(p1, grads, m1, v1, s1, **kw)
        F.adamw(p2, [g.clone() for g in grads], m2, v2, s2, impl=impl, **kw)
    for a, b in zip(p1 + m1 + v1, p2 + m2 + v2):
        assert (a - b).abs().max().item() <= 1e-6 * max(1.0, b.abs().max().item())


def test_decay_modes_closed_form():
    """With a zero gradient the Adam part is exactly 0, which isolates the decay: decoupled multiplies by
    1 - lr*wd, independent by 1 - wd*lr/lr_max; l2 feeds wd*theta to Adam, so the first step moves every
    element by lr*sign(theta) (m_hat/sqrt(v_hat) = sign) -- computed here in float64."""
    lr, lr_max, wd = 3e-3, 1e-2, 0.2
    for decay, expected in [
        ("decoupled", lambda p: p * (1 - lr * wd)),
        ("independent", lambda p: p * (1 - wd * lr / lr_max)),
        ("l2", lambda p: p - lr * (wd * p).sign() * (wd * p).abs() / ((wd * p).abs() + 1e-8)),
    ]:
        params, m, v, steps = make_state(SHAPES, dtype=torch.float64)
        before = [p.clone() for p in params]
        zeros = [torch.zeros_like(p) for p in params]
        F.adamw_reference(params, zeros, m, v, steps, lr=lr, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=wd,
                          decay=decay, lr_max=lr_max)
        for p, b in zip(params, before):
            torch.testing.assert_close(p, expected(b), rtol=1e-12, atol=1e-12)


def test_independent_decay_does_not_move_with_peak_lr():
    """The point of 'independent': the same wd gives the same decay at the schedule's peak whatever the peak lr."""
    for lr_max in (1e-4, 1e-3, 1e-2):
        assert F.effective_weight_decay("independent", 0.1, lr_max) * lr_max == pytest.approx(0.1)
    assert F.effective_weight_decay("decoupled", 0.1, 1e-3) == 0.1
    with pytest.raises(ValueError, match="lr_max"):
        F.effective_weight_decay("independent", 0.1, 0.0)


def test_unknown_decay_and_impl():
    params, m, v, steps = make_state([(3,)])
    with pytest.raises(ValueError, match="decay"):
        F.adamw(params, [torch.ones(3)], m, v, steps, weight_decay=0.1, decay="l1", **HP)
    with pytest.raises(ValueError, match="impl"):
        F.adamw(params, [torch.ones(3)], m, v, steps, weight_decay=0.1, impl="cuda", **HP)


def test_clip_coefficient_matches_torch():
    g = [torch.randn(10, 10) * 3, torch.randn(7)]
    params = [torch.nn.Parameter(torch.empty_like(x)) for x in g]
    for p, x in zip(params, g):
        p.grad = x.clone()
    total = torch.nn.utils.clip_grad_norm_(params, 1.0).item()
    coef = F.clip_coefficient(total, 1.0)
    for p, x in zip(params, g):
        torch.testing.assert_close(p.grad, x * coef, rtol=1e-6, atol=0)
    assert F.clip_coefficient(0.5, 1.0) == 1.0
    assert F.clip_coefficient(total, None) == 1.0
    assert F.clip_coefficient(float("inf"), 1.0) == 1.0
