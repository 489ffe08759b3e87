"""Weight-decay schedules (zeroadamw.schedules) and lr schedules from transformers driving our optimizers: exact
per-step values, the exact decay each decay mode applies under both schedules, resume, skipped steps, bad input."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import get_scheduler

from zeroadamw import AdamW, ShardedAdamW, SparseAdamW

T = 12


def m_linear(t):
    return max(0.0, 1.0 - t / T)


def m_cosine(t):
    return 0.5 * (1.0 + math.cos(math.pi * min(t, T) / T))


def make(cls, params, **kw):
    if cls is ShardedAdamW:
        return ShardedAdamW(params, stage=2, **kw)
    return cls(params, **kw)


def zero_grad_step(opt, params):
    """A backward whose gradients are exactly zero (present, not None): Adam's term is 0 / (0 + eps) = 0, so the
    only change to the weights is the decay."""
    loss = sum((p * 0.0).sum() for p in params)
    loss.backward()
    opt.step()
    opt.zero_grad()


@pytest.mark.parametrize("cls", [ShardedAdamW, AdamW])
@pytest.mark.parametrize("name,m", [("linear", m_linear), ("cosine", m_cosine), ("constant", lambda t: 1.0)])
def test_named_schedule_values_per_step(cls, name, m):
    p = torch.nn.Parameter(torch.randn(5))
    opt = make(cls, [p], lr=1e-3, weight_decay=0.2, wd_schedule=name, wd_schedule_steps=T)
    g = opt.param_groups[0]
    assert g["weight_decay"] == 0.2 * m(0) and g["initial_weight_decay"] == 0.2 and g["wd_step"] == 0
    for t in range(1, T + 3):
        zero_grad_step(opt, [p])
        assert g["wd_step"] == t
        assert g["weight_decay"] == pytest.approx(0.2 * m(t), rel=1e-15, abs=1e-18), (t, g["weight_decay"])


@pytest.mark.parametrize("cls", [ShardedAdamW, AdamW])
@pytest.mark.parametrize("decay", ["decoupled", "independent"])
def test_decay_applied_is_exactly_lr_schedule_times_wd_schedule(cls, decay):
    """theta_t = theta_{t-1} (1 - eta_t lambda_t) (decoupled) or (1 - eta_t / eta_max * lambda_t) (independent),
    eta_t from transformers' cosine-with-warmup scheduler, lambda_t = lambda * m_linear(t)."""
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(7, 3))
    q = torch.nn.Parameter(torch.randn(4))  # a second group, no schedule, its own wd
    lr, wd = 0.05, 0.5
    opt = make(cls, [{"params": [p], "wd_schedule": "linear", "wd_schedule_steps": T},
                     {"params": [q], "weight_decay": 0.1}], lr=lr, weight_decay=wd, decay=decay)
    sched = get_scheduler("cosine", opt, num_warmup_steps=3, num_training_steps=T)
    exp_p, exp_q = p.detach().double().clone(), q.detach().double().clone()
    for t in range(T):
        eta = opt.param_groups[0]["lr"]
        assert opt.param_groups[1]["lr"] == eta
        scale = 1.0 if decay == "decoupled" else 1.0 / lr
        exp_p *= 1.0 - eta * scale * wd * m_linear(t)
        exp_q *= 1.0 - eta * scale * 0.1
        zero_grad_step(opt, [p, q])
        sched.step()
        torch.testing.assert_close(p.detach().double(), exp_p, rtol=2e-6, atol=0)
        torch.testing.assert_close(q.detach().double(), exp_q, rtol=2e-6, atol=0)
    assert opt.param_groups[1]["weight_decay"] == 0.1 and "wd_step" not in opt.param_groups[1]


def test_sparse_catchup_uses_each_missed_steps_scheduled_decay():
    """SparseAdamW, rows mode: a row idle for k steps gets, when it comes back, exactly prod (1 - eta_t lambda_t)
    over the steps it missed (lambda_t scheduled), then its first Adam step."""
    torch.manual_seed(0)
    emb = torch.nn.Parameter(torch.randn(4, 3))
    lr, wd = 0.05, 0.5
    opt = SparseAdamW([{"params": [emb], "sparse": "rows"}], lr=lr, weight_decay=wd, wd_schedule="cosine",
                      wd_schedule_steps=T)
    sched = get_scheduler("linear", opt, num_warmup_steps=2, num_training_steps=T)
    row1 = emb.detach()[1].double().clone()
    row1_before = emb.detach()[1].clone()
    gvec = torch.tensor([0.3, -0.2, 0.1])
    back_at = 6
    for t in range(back_at + 1):
        eta = opt.param_groups[0]["lr"]
        rows = torch.zeros(4, 3)
        rows[0] = gvec  # row 0 every step; row 1 only at step back_at
        if t == back_at:
            rows[1] = gvec
        (emb * rows).sum().backward()
        opt.step()
        opt.zero_grad()
        sched.step()
        if t < back_at:
            row1 *= 1.0 - eta * wd * m_cosine(t)
            assert torch.equal(emb.detach()[1], row1_before)  # lazy: an idle row is not touched while idle
        else:  # the catch-up, then this step's decay and first (bias-corrected) Adam step: m_hat = g, v_hat = g^2
            row1 *= 1.0 - eta * wd * m_cosine(t)
            row1 -= eta * gvec.double() / (gvec.double().abs() + 1e-8)
    torch.testing.assert_close(emb.detach()[1].double(), row1, rtol=2e-6, atol=1e-7)


def test_skipped_step_does_not_advance_the_schedule():
    p = torch.nn.Parameter(torch.randn(6))
    opt = ShardedAdamW([p], lr=1e-2, weight_decay=0.3, stage=2, wd_schedule="linear", wd_schedule_steps=T)
    zero_grad_step(opt, [p])
    before = p.detach().clone()
    (p * float("nan")).sum().backward()
    opt.step()
    opt.zero_grad()
    assert opt.last_step_skipped and torch.equal(p.detach(), before)
    g = opt.param_groups[0]
    assert g["wd_step"] == 1 and g["weight_decay"] == pytest.approx(0.3 * m_linear(1), rel=1e-15)


def test_callable_schedule_and_resume_continue_bit_for_bit(tmp_path):
    from zeroadamw import checkpoint

    def sched_fn(t):
        return 1.0 if t < 3 else 0.25

    def build(seed=0):
        torch.manual_seed(seed)
        model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
        return model, ShardedAdamW(model.parameters(), lr=1e-2, weight_decay=0.4, stage=2, wd_schedule=sched_fn)

    def train(model, opt, steps, start):
        for s in range(start, start + steps):
            g = torch.Generator().manual_seed(s)
            x, y = torch.randn(8, 5, generator=g), torch.randn(8, 2, generator=g)
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()
            opt.zero_grad()

    ref_model, ref_opt = build()
    train(ref_model, ref_opt, 8, 0)
    model, opt = build()
    train(model, opt, 4, 0)
    assert opt.param_groups[0]["weight_decay"] == 0.1
    sd = opt.state_dict()
    json.dumps([{k: v for k, v in g.items() if k != "params"} for g in sd["param_groups"]])  # plain numbers only
    checkpoint.save(tmp_path / "ck", model=model, optimizer=opt)
    model2, opt2 = build(seed=1)  # other weights: all of it must come from the checkpoint
    checkpoint.load(tmp_path / "ck", model=model2, optimizer=opt2)
    assert opt2.param_groups[0]["wd_step"] == 4 and opt2.param_groups[0]["weight_decay"] == 0.1
    train(model2, opt2, 4, 4)
    for a, b in zip(ref_model.parameters(), model2.parameters()):
        assert torch.equal(a, b)


def test_bad_schedules_are_refused_clearly():
    p = torch.nn.Parameter(torch.randn(3))
    with pytest.raises(ValueError, match="wd_schedule_steps"):
        ShardedAdamW([p], wd_schedule="cosine")
    with pytest.raises(ValueError, match="unknown wd_schedule 'cosin'"):
        ShardedAdamW([p], wd_schedule="cosin", wd_schedule_steps=5)
    with pytest.raises(TypeError, match="callable"):
        AdamW([p], wd_schedule=3)
    with pytest.raises(ValueError, match="finite and >= 0"):
        AdamW([p], wd_schedule=lambda t: -1.0)
    opt = AdamW([p], lr=1e-2, weight_decay=0.1, wd_schedule=lambda t: 1.0 if t < 1 else float("nan"))
    p.grad = torch.ones(3)
    with pytest.raises(ValueError, match="step 1"):
        opt.step()
    assert opt.param_groups[0]["weight_decay"] == 0.1 and opt.param_groups[0]["wd_step"] == 0
    # a bad group leaves the optimizer as it was
    opt2 = ShardedAdamW([p], lr=1e-2)
    with pytest.raises(ValueError, match="param group 1"):
        opt2.add_param_group({"params": [torch.nn.Parameter(torch.randn(2))], "wd_schedule": "linear"})
    assert len(opt2.param_groups) == 1


@pytest.mark.parametrize("name", ["constant_with_warmup", "linear", "cosine"])
def test_transformers_lr_schedules_drive_our_optimizer_exactly(name):
    """The standard schedulers set group['lr'] per step; our optimizers read it every step (and keep
    initial_lr = the peak for decay='independent')."""
    p = torch.nn.Parameter(torch.randn(3))
    peak, W = 1e-3, 3
    opt = ShardedAdamW([p], lr=peak, stage=2, decay="independent")
    sched = get_scheduler(name, opt, num_warmup_steps=W, num_training_steps=T)
    for t in range(T):
        if t < W:
            want = peak * t / W
        elif name == "constant_with_warmup":
            want = peak
        elif name == "linear":
            want = peak * max(0.0, (T - t) / (T - W))
        else:
            want = peak * 0.5 * (1.0 + math.cos(math.pi * (t - W) / (T - W)))
        assert opt.param_groups[0]["lr"] == pytest.approx(want, rel=1e-12, abs=1e-18), (t, name)
        assert opt.param_groups[0]["initial_lr"] == peak
        zero_grad_step(opt, [p])
        sched.step()
