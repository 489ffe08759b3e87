"""ShardedAdamW in one process (no torch.distributed): a plain AdamW that must equal torch.optim.AdamW."""

import copy
import math

import pytest
import torch
from torch import nn

from helpers import MLP, max_state_err, mlp_batch, param_groups, rel_err
from zeroadamw import ShardedAdamW
from zeroadamw import functional as F


def run_pair(opt_kw, torch_kw, steps=50, groups=True, clip=None, bucket_size=64):
    torch.manual_seed(0)
    model = MLP()
    ref_model = copy.deepcopy(model)
    opt = ShardedAdamW(param_groups(model) if groups else model.parameters(), bucket_size=bucket_size,
                       max_grad_norm=clip, **opt_kw)
    ref = torch.optim.AdamW(param_groups(ref_model) if groups else ref_model.parameters(), **torch_kw)
    norms = []
    for step in range(steps):
        for m, o in ((model, opt), (ref_model, ref)):
            m.loss(mlp_batch(step, 0)).backward()
        norms.append(torch.nn.utils.clip_grad_norm_(list(ref_model.parameters()), clip or float("inf")).item())
        opt.step()
        ref.step()
        opt.zero_grad()
        ref.zero_grad()
        assert opt.grad_norm == pytest.approx(norms[-1], rel=1e-6)
    return model, ref_model, opt, ref


@pytest.mark.parametrize("impl,torch_kw", [("reference", dict(foreach=False)), ("fused", dict(fused=True)),
                                           ("foreach", dict(foreach=True))])
def test_equals_torch_adamw_bit_for_bit(impl, torch_kw):
    """50 steps, two param groups (different lr / wd / betas), a frozen param, a never-used param, odd sizes."""
    model, ref_model, opt, ref = run_pair(dict(impl=impl), torch_kw)
    for p, q in zip(model.parameters(), ref_model.parameters()):
        assert torch.equal(p, q)
    sd, rsd = opt.state_dict(), ref.state_dict()
    assert max_state_err(sd, rsd) == 0.0
    assert sd["param_groups"][0]["params"] == rsd["param_groups"][0]["params"]
    # frozen and never-updated params have no state, as in torch
    index = {id(p): k for k, p in enumerate(p for g in opt.param_groups for p in g["params"])}
    assert index[id(model.frozen)] not in sd["state"] and index[id(model.unused)] not in sd["state"]


def test_clipping_matches_clip_grad_norm():
    model, ref_model, opt, ref = run_pair(dict(impl="fused"), dict(fused=True), clip=0.5, steps=30)
    for p, q in zip(model.parameters(), ref_model.parameters()):
        assert rel_err(p, q) <= 1e-6


def test_state_bytes_one_process():
    torch.manual_seed(0)
    model = MLP()
    opt = ShardedAdamW(model.parameters())
    assert opt.state_bytes() == 0  # lazily allocated, like torch
    model.loss(mlp_batch(0, 0)).backward()
    opt.step()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert opt.state_bytes() == trainable * 2 * 4  # exp_avg + exp_avg_sq, fp32, no padding at N = 1


@pytest.mark.parametrize("decay", ["independent", "l2"])
def test_decay_modes_follow_the_reference_kernel_under_a_scheduler(decay):
    """With warm-up + cosine (torch LambdaLR), every step uses the group's current lr, and 'independent' divides
    by the group's initial lr: compare with a hand-written loop over the reference kernel."""
    torch.manual_seed(0)
    model = MLP()
    params = [p for n, p in model.named_parameters() if p.requires_grad and n != "unused"]
    ref_params = [p.detach().clone() for p in params]
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    steps = [torch.zeros(()) for _ in params]
    opt = ShardedAdamW(params, lr=2e-2, weight_decay=0.3, decay=decay, impl="fused")
    total, warm = 40, 5

    def lam(s):
        return (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / (total - warm)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lam)
    for step in range(total):
        lr = opt.param_groups[0]["lr"]
        assert lr == pytest.approx(2e-2 * lam(step))
        model.loss(mlp_batch(step, 0)).backward()
        grads = [p.grad.clone() for p in params]
        opt.step()
        opt.zero_grad()
        sched.step()
        F.adamw_reference(ref_params, grads, m, v, steps, lr=lr, beta1=0.9, beta2=0.999, eps=1e-8,
                          weight_decay=0.3, decay=decay, lr_max=2e-2)
        # teacher-forced: the reference continues from the same point
        worst = max(rel_err(p, q) for p, q in zip(params, ref_params))
        assert worst <= 1e-6, f"step {step}: {worst}"
        for p, q in zip(params, ref_params):
            q.copy_(p.detach())


def test_accumulation_one_process_equals_whole_batch():
    torch.manual_seed(0)
    a = MLP()
    b = copy.deepcopy(a)
    opt_a = ShardedAdamW(a.parameters(), lr=1e-2)
    opt_b = ShardedAdamW(b.parameters(), lr=1e-2)
    for step in range(10):
        x, y = mlp_batch(step, 0, n=8)
        for k in range(4):
            with opt_a.no_sync() if k < 3 else torch.enable_grad():
                (a.loss((x[2 * k : 2 * k + 2], y[2 * k : 2 * k + 2])) / 4).backward()
        b.loss((x, y)).backward()
        opt_a.step(), opt_b.step()
        opt_a.zero_grad(), opt_b.zero_grad()
    for p, q in zip(a.parameters(), b.parameters()):
        assert rel_err(p, q) <= 1e-5


def test_bf16_params_with_fp32_master():
    """bf16 params, fp32 master shard: the master follows torch AdamW run on fp32 copies fed the (upcast) bf16
    gradients -- bit for bit (same fused kernel) -- and the params are the master rounded to bf16."""
    torch.manual_seed(0)
    model = MLP().to(torch.bfloat16)
    masters = [p.detach().float().clone().requires_grad_() for p in model.parameters() if p.requires_grad]
    opt = ShardedAdamW(model.parameters(), lr=1e-2, impl="fused")
    ref = torch.optim.AdamW(masters, lr=1e-2, fused=True)
    trainable = [p for p in model.parameters() if p.requires_grad]
    for step in range(30):
        model.loss(mlp_batch(step, 0, dtype=torch.bfloat16)).backward()
        for q, p in zip(masters, trainable):
            q.grad = p.grad.float() if p.grad is not None else None
        opt.step()
        ref.step()
        opt.zero_grad()
    for p, q in zip(trainable, masters):
        assert torch.equal(opt.state[p]["master"].view_as(p), q.detach())
        assert torch.equal(p, q.detach().to(torch.bfloat16))
        assert opt.state[p]["exp_avg"].dtype == torch.float32
    n = sum(p.numel() for p in trainable)
    assert opt.state_bytes() == n * 3 * 4  # exp_avg, exp_avg_sq, master: fp32


def test_bf16_without_master_keeps_state_in_bf16():
    torch.manual_seed(0)
    model = MLP().to(torch.bfloat16)
    ref_model = copy.deepcopy(model)
    opt = ShardedAdamW(model.parameters(), lr=1e-2, master_dtype=None, impl="fused")
    ref = torch.optim.AdamW(ref_model.parameters(), lr=1e-2, fused=True)
    for step in range(20):
        for m, o in ((model, opt), (ref_model, ref)):
            m.loss(mlp_batch(step, 0, dtype=torch.bfloat16)).backward()
            o.step()
            o.zero_grad()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), ref_model.parameters()))
    assert all(st["exp_avg"].dtype == torch.bfloat16 for st in opt.state.values())


@pytest.mark.parametrize("bad", ["nan", "inf"])
def test_non_finite_gradient_skips_the_step(bad):
    torch.manual_seed(0)
    model = MLP()
    opt = ShardedAdamW(model.parameters(), lr=1e-2)
    for step in range(3):
        model.loss(mlp_batch(step, 0)).backward()
        opt.step()
        opt.zero_grad()
    before = copy.deepcopy(model.state_dict())
    sd = copy.deepcopy(opt.state_dict())
    model.loss(mlp_batch(3, 0)).backward()
    model.fc1.weight.grad[0, 0] = float(bad)
    opt.step()
    assert opt.last_step_skipped and not math.isfinite(opt.grad_norm)
    for k, t in model.state_dict().items():
        assert torch.equal(t, before[k])
    after = opt.state_dict()
    for k, st in sd["state"].items():
        for name, t in st.items():
            assert torch.equal(t, after["state"][k][name])


def test_grad_scaler_fp16_matches_master_weight_reference():
    """fp16 params + GradScaler: the same skip decisions, the same scale trajectory, and the same fp32 master as the
    textbook recipe (torch AdamW on fp32 master copies, GradScaler.unscale_/step on them)."""
    torch.manual_seed(0)
    model = MLP().to(torch.float16)
    ref_model = copy.deepcopy(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    ref_trainable = [p for p in ref_model.parameters() if p.requires_grad]
    masters = [p.detach().float().clone().requires_grad_() for p in ref_trainable]
    opt = ShardedAdamW(model.parameters(), lr=1e-2, impl="fused")
    ref = torch.optim.AdamW(masters, lr=1e-2, fused=True)
    # a huge initial scale overflows fp16 for the first steps: both must skip and back off identically
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**24, growth_interval=3)
    ref_scaler = torch.amp.GradScaler("cpu", init_scale=2.0**24, growth_interval=3)
    skipped = 0
    for step in range(25):
        batch = mlp_batch(step, 0, dtype=torch.float16)
        scaler.scale(model.loss(batch)).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        ref_scaler.scale(ref_model.loss(batch)).backward()
        for q, p in zip(masters, ref_trainable):
            q.grad = None if p.grad is None else p.grad.float()
            p.grad = None
        ref_scaler.step(ref)
        ref_scaler.update()
        ref.zero_grad()
        with torch.no_grad():
            for p, q in zip(ref_trainable, masters):
                p.copy_(q)
        skipped += opt.last_step_skipped
        assert scaler.get_scale() == ref_scaler.get_scale(), f"step {step}"
    assert skipped >= 1
    for p, q in zip(trainable, masters):
        assert rel_err(opt.state[p]["master"].view_as(p), q) <= 1e-6


def test_state_dict_round_trips_through_torch_adamw():
    """ours -> torch.optim.AdamW -> continue == ours continued; torch -> ours -> continue == torch continued."""
    torch.manual_seed(0)
    model = MLP()
    opt = ShardedAdamW(param_groups(model), impl="reference")
    for step in range(5):
        model.loss(mlp_batch(step, 0)).backward()
        opt.step()
        opt.zero_grad()
    sd = opt.state_dict()
    buf = __import__("io").BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)  # tensor-only payload
    twin = copy.deepcopy(model)
    torch_opt = torch.optim.AdamW(param_groups(twin), foreach=False)
    torch_opt.load_state_dict(sd)
    for step in range(5, 10):
        for m, o in ((model, opt), (twin, torch_opt)):
            m.loss(mlp_batch(step, 0)).backward()
            o.step()
            o.zero_grad()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), twin.parameters()))
    # and back: torch's state into a fresh ShardedAdamW
    back = copy.deepcopy(twin)
    ours = ShardedAdamW(param_groups(back), impl="reference")
    ours.load_state_dict(torch_opt.state_dict())
    for step in range(10, 15):
        for m, o in ((back, ours), (twin, torch_opt)):
            m.loss(mlp_batch(step, 0)).backward()
            o.step()
            o.zero_grad()
    assert all(torch.equal(p, q) for p, q in zip(back.parameters(), twin.parameters()))
    assert max_state_err(ours.state_dict(), torch_opt.state_dict()) == 0.0


def test_load_state_dict_rejects_a_different_model_without_changing_anything():
    torch.manual_seed(0)
    model = MLP()
    opt = ShardedAdamW(param_groups(model))
    model.loss(mlp_batch(0, 0)).backward()
    opt.step()
    good = opt.state_dict()
    other = nn.Sequential(nn.Linear(16, 9), nn.Linear(9, 7))
    wrong = ShardedAdamW(other.parameters())
    other(torch.randn(2, 16)).sum().backward()
    wrong.step()
    with pytest.raises(ValueError, match="parameter groups"):
        opt.load_state_dict(wrong.state_dict())
    bad = copy.deepcopy(good)
    k = next(iter(bad["state"]))
    bad["state"][k]["exp_avg"] = torch.zeros(3, 3)
    bad["param_groups"][0]["lr"] = 123.0
    with pytest.raises(ValueError, match="shape"):
        opt.load_state_dict(bad)
    assert opt.param_groups[0]["lr"] != 123.0  # validated before anything changed
    after = opt.state_dict()
    assert max_state_err(after, good) == 0.0
    with pytest.raises(ValueError, match="state dict"):
        opt.load_state_dict({"state": {}})
    # the groups' sizes are checked before their hyperparameters (the clearer message when both are wrong)
    bad = copy.deepcopy(good)
    bad["param_groups"][0]["lr"] = "fast"
    bad["param_groups"][-1]["params"] = bad["param_groups"][-1]["params"][:-1]
    with pytest.raises(ValueError, match="same param groups"):
        opt.load_state_dict(bad)
    assert max_state_err(opt.state_dict(), good) == 0.0


BAD_ARGS = [
    (dict(lr=-1.0), ValueError, "learning rate"),
    (dict(lr="1e-3"), TypeError, "lr"),
    (dict(betas=(1.0, 0.999)), ValueError, "beta parameter at index 0"),
    (dict(betas=(0.9, -0.1)), ValueError, "beta parameter at index 1"),
    (dict(betas=(0.9,)), ValueError, "pair"),
    (dict(eps=-1e-8), ValueError, "epsilon"),
    (dict(weight_decay=-0.1), ValueError, "weight_decay"),
    (dict(decay="adamw"), ValueError, "decay mode"),
    (dict(stage=3), ValueError, "stage"),
    (dict(stage=0), ValueError, "stage"),
    (dict(bucket_size=0), ValueError, "bucket_size"),
    (dict(bucket_size=1.5), ValueError, "bucket_size"),
    (dict(master_dtype=torch.int8), TypeError, "master_dtype"),
    (dict(reduce_dtype="bf16"), TypeError, "reduce_dtype"),
    (dict(max_grad_norm=0.0), ValueError, "max_grad_norm"),
    (dict(max_grad_norm=-1.0), ValueError, "max_grad_norm"),
    (dict(grads_reduced=True, stage=2), ValueError, "stage=1"),
    (dict(impl="triton"), ValueError, "impl"),
    (dict(decay="independent", lr=0.0), ValueError, "initial lr"),
    (dict(rule=["adamw"]), ValueError, "Unknown rule"),
    (dict(rule="adalomo", clip_threshold=0.0), ValueError, "clip_threshold"),
]


@pytest.mark.parametrize("kwargs,exc,match", BAD_ARGS)
def test_bad_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        ShardedAdamW(nn.Linear(3, 3).parameters(), **kwargs)


def test_bad_params():
    lin = nn.Linear(3, 3)
    with pytest.raises(ValueError, match="listed twice"):
        ShardedAdamW([lin.weight, lin.weight])
    with pytest.raises(ValueError, match="listed twice"):
        ShardedAdamW([{"params": [lin.weight]}, {"params": [lin.weight, lin.bias]}])
    with pytest.raises(ValueError, match="one device"):
        ShardedAdamW([lin.weight, nn.Parameter(torch.empty(3, device="meta"))])
    with pytest.raises(TypeError, match="floating-point"):
        ShardedAdamW([torch.zeros(3, dtype=torch.int64)])
    with pytest.raises(ValueError, match="contiguous"):
        ShardedAdamW([nn.Parameter(torch.randn(4, 5).t())])
    with pytest.raises(ValueError, match="param group 1"):
        ShardedAdamW([{"params": [lin.weight]}, {"params": [lin.bias], "lr": -1.0}])
    with pytest.raises(TypeError, match="Tensors"):
        ShardedAdamW([lin.weight, "bias"])


def test_sparse_gradient_is_refused():
    emb = nn.Embedding(10, 4, sparse=True)
    opt = ShardedAdamW(emb.parameters())
    emb(torch.tensor([1, 2])).sum().backward()
    before = emb.weight.detach().clone()
    with pytest.raises(TypeError, match="sparse gradient"):
        opt.step()
    assert torch.equal(emb.weight, before)


def test_grad_of_wrong_shape_or_dtype():
    lin = nn.Linear(3, 3)
    opt = ShardedAdamW(lin.parameters())
    lin(torch.randn(2, 3)).sum().backward()
    lin.weight.grad.data = torch.zeros(9)  # .data bypasses torch's own check
    with pytest.raises(ValueError, match="shape"):
        opt.step()
    lin.weight.grad = None
    lin(torch.randn(2, 3)).sum().backward()
    lin.weight.grad.data = torch.zeros(3, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="dtype"):
        opt.step()


def test_param_unfrozen_after_construction_is_an_error():
    lin = nn.Linear(3, 3)
    lin.bias.requires_grad_(False)
    opt = ShardedAdamW(lin.parameters())
    lin.bias.requires_grad_(True)
    lin(torch.randn(2, 3)).sum().backward()
    with pytest.raises(ValueError, match="frozen when the optimizer was built"):
        opt.step()


def test_step_without_gradients_changes_nothing():
    lin = nn.Linear(3, 3)
    before = copy.deepcopy(lin.state_dict())
    opt = ShardedAdamW(lin.parameters())
    opt.step()
    assert all(torch.equal(t, before[k]) for k, t in lin.state_dict().items())
    assert opt.state_dict()["state"] == {} and opt.grad_norm == 0.0


def test_closure_and_zero_grad():
    torch.manual_seed(0)
    model = MLP()
    opt = ShardedAdamW(model.parameters())

    def closure():
        opt.zero_grad()
        loss = model.loss(mlp_batch(0, 0))
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert isinstance(loss, torch.Tensor) and opt.grad_norm > 0
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())


def test_add_param_group_after_the_first_step():
    torch.manual_seed(0)
    model = MLP()
    head = nn.Linear(7, 3)
    ref_model, ref_head = copy.deepcopy(model), copy.deepcopy(head)
    opt = ShardedAdamW(model.parameters(), lr=1e-2, impl="reference")
    ref = torch.optim.AdamW(ref_model.parameters(), lr=1e-2, foreach=False)
    for step in range(6):
        if step == 3:
            opt.add_param_group({"params": head.parameters(), "lr": 5e-3})
            ref.add_param_group({"params": ref_head.parameters(), "lr": 5e-3})
        for m, h, o in ((model, head, opt), (ref_model, ref_head, ref)):
            out = m(mlp_batch(step, 0)[0])
            (h(out).pow(2).mean() if step >= 3 else out.pow(2).mean()).backward()
            o.step()
            o.zero_grad()
    for p, q in zip(list(model.parameters()) + list(head.parameters()),
                    list(ref_model.parameters()) + list(ref_head.parameters())):
        assert torch.equal(p, q)


def test_independent_decay_uses_the_schedule_peak():
    """OneCycleLR stores its *starting* lr (max_lr / div_factor) in initial_lr and the peak in max_lr: the
    'independent' decay must divide by the peak, so that at the peak the decay is exactly wd."""
    w = nn.Parameter(torch.ones(4))
    opt = ShardedAdamW([w], lr=1e-2, weight_decay=0.1, decay="independent")
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=10, pct_start=0.3)
    for _ in range(2):  # reach the peak (step 0.3 * 10 - 1 = 2)
        w.grad = torch.zeros(4)
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-2)
    before = w.detach().clone()
    w.grad = torch.zeros(4)
    opt.step()
    torch.testing.assert_close(w.detach(), before * (1 - 0.1), rtol=1e-6, atol=0)
    # a tensor lr is copied into initial_lr, not aliased (a scheduler's in-place update would move both)
    v = nn.Parameter(torch.ones(2))
    lr = torch.tensor(1e-2)
    o2 = ShardedAdamW([v], lr=lr, decay="independent")
    assert o2.param_groups[0]["initial_lr"] is not o2.param_groups[0]["lr"]


def test_weights_changed_before_the_first_step_are_not_reverted_by_the_master():
    """accelerate's prepare() round-trips state_dict/load_state_dict before training; weights loaded after that
    (adapters, a re-initialised head) must survive the first step of a bf16 model with fp32 master."""
    torch.manual_seed(0)
    model = MLP().to(torch.bfloat16)
    opt = ShardedAdamW(model.parameters(), lr=0.0, weight_decay=0.0)
    opt.load_state_dict(opt.state_dict())
    with torch.no_grad():
        model.fc1.weight.fill_(1.0)
    model.loss(mlp_batch(0, 0, dtype=torch.bfloat16)).backward()
    opt.step()
    assert torch.all(model.fc1.weight == 1.0)


def test_resume_warning_survives_a_state_dict_round_trip(tmp_path):
    from zeroadamw import checkpoint as ck

    torch.manual_seed(0)
    model = MLP()
    opt = ShardedAdamW(model.parameters())
    model.loss(mlp_batch(0, 0)).backward()
    opt.step()
    ck.save(tmp_path / "c", model=model, optimizer=opt)
    m2 = MLP()
    ck.load(tmp_path / "c", model=m2)
    fresh = ShardedAdamW(m2.parameters())
    fresh.load_state_dict(fresh.state_dict())  # what accelerate.prepare does
    m2.loss(mlp_batch(1, 0)).backward()
    with pytest.warns(UserWarning, match="FRESH state"):
        fresh.step()


def test_unsupported_torch_flags_are_refused_on_load():
    lin = nn.Linear(3, 3)
    torch_opt = torch.optim.AdamW(lin.parameters(), amsgrad=True)
    lin(torch.randn(2, 3)).sum().backward()
    torch_opt.step()
    opt = ShardedAdamW(lin.parameters())
    with pytest.raises(ValueError, match="amsgrad"):
        opt.load_state_dict(torch_opt.state_dict())


def test_grad_scaler_through_a_wrapper_that_hides_the_argument():
    """GradScaler's newer contract (grad_scale set on the optimizer, step() called without the scaler), as when
    accelerate wraps step(): fine in one process -- the scaler's own inf check saw the same gradients."""
    torch.manual_seed(0)
    model = MLP().to(torch.float16)
    twin = copy.deepcopy(model)
    opt = ShardedAdamW(model.parameters(), lr=1e-3)
    opt2 = ShardedAdamW(twin.parameters(), lr=1e-3)
    inner = opt2.step

    def hidden(*args, **kwargs):  # no grad_scaler in the signature
        return inner(*args, **kwargs)

    opt2.step = hidden
    s1 = torch.amp.GradScaler("cpu", init_scale=2.0**20, growth_interval=2)
    s2 = torch.amp.GradScaler("cpu", init_scale=2.0**20, growth_interval=2)
    for step in range(8):
        batch = mlp_batch(step, 0, dtype=torch.float16)
        for m, o, s in ((model, opt, s1), (twin, opt2, s2)):
            s.scale(m.loss(batch)).backward()
            s.step(o)
            s.update()
            o.zero_grad()
        assert s1.get_scale() == s2.get_scale()
        assert opt.grad_norm == pytest.approx(opt2.grad_norm, rel=1e-6, nan_ok=True)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), twin.parameters()))


def test_a_second_optimizer_on_the_same_params_after_the_first_is_gone():
    import gc

    torch.manual_seed(0)
    model = MLP()
    opt = ShardedAdamW(model.parameters())
    del opt
    gc.collect()
    opt = ShardedAdamW(model.parameters())
    model.loss(mlp_batch(0, 0)).backward()
    opt.step()
    assert opt.grad_norm > 0


def test_an_engine_that_outlives_its_optimizer_leaves_gradients_alone():
    import gc

    torch.manual_seed(0)
    model = MLP()
    opt = ShardedAdamW(model.parameters(), step_in_backward=True)  # hooked even in one process
    engine = opt.engine
    del opt
    gc.collect()
    model.loss(mlp_batch(0, 0)).backward()
    used = [n for n, p in model.named_parameters() if p.requires_grad and n != "unused"]
    assert all(dict(model.named_parameters())[n].grad is not None for n in used)  # no optimizer took them
    assert not engine.errors and not any(any(b.present) for b in engine.buckets)
