"""torch.optim's own contract, for zeroadamw's optimizers: the generic checks of PyTorch's optimizer test suite
(test/optim/test_optim.py with torch/testing/_internal/common_optimizers.py) ported to AdamW and ShardedAdamW.

State dicts both ways (torch <-> ours, then training continues identically), deepcopy and pickling (the copy owns
copied params and steps in lockstep with the original), state-dict / step hooks, LR schedulers, complex params,
strided gradients and params, float ``step`` in old state dicts, zero_grad, add_param_group, tensor lr.
One process, no torch.distributed (except the one test that checks the refusal at world size 2).
"""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from helpers import MLP, max_state_err, mlp_batch, param_groups
from zeroadamw import AdamW, ShardedAdamW, SparseAdamW
from zeroadamw import functional as F

STATE_KEYS = ("step", "exp_avg", "exp_avg_sq")


# ----------------------------------------------------------------------------------------------------- helpers
def train(pairs, steps: int, start: int = 0, scheds=()) -> None:
    """``steps`` training steps of every (model, optimizer) pair on the same batches."""
    for step in range(start, start + steps):
        for model, opt in pairs:
            model.loss(mlp_batch(step, 0)).backward()
            opt.step()
            opt.zero_grad()
        for s in scheds:
            s.step()


def assert_same_params(a, b, atol: float = 0.0) -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert p is not q
        if atol:
            torch.testing.assert_close(p, q, atol=atol, rtol=atol, msg=name)
        else:
            assert torch.equal(p, q), f"{name}: max diff {(p - q).abs().max().item()}"


def assert_same_state(sd, ref_sd, atol: float = 0.0, keys=("exp_avg", "exp_avg_sq")) -> None:
    """Same param indices, same step, moments equal (max relative error <= atol)."""
    assert max_state_err(sd, ref_sd, keys) <= atol


def assert_identical_state(sd, ref_sd) -> None:
    """Same entries, same keys, every tensor equal (any update rule's state)."""
    assert sd["state"].keys() == ref_sd["state"].keys()
    for k, ref in ref_sd["state"].items():
        assert sd["state"][k].keys() == ref.keys(), k
        for name, t in ref.items():
            assert torch.equal(sd["state"][k][name], t), (k, name)


def torch_pair(impl: str):
    """(zeroadamw impl, torch.optim.AdamW kwargs) pairs that are bit-identical."""
    return {"reference": dict(foreach=False), "auto": dict(fused=True), "foreach": dict(foreach=True)}[impl]


def build(kind: str, model):
    """The optimizer configurations the generic checks run over."""
    groups = param_groups(model)
    return {
        "AdamW": lambda: AdamW(groups),
        "AdamW-wd-schedule": lambda: AdamW(groups, wd_schedule="cosine", wd_schedule_steps=12),
        "Sharded": lambda: ShardedAdamW(groups, bucket_size=64),
        "Sharded-stage1": lambda: ShardedAdamW(groups, stage=1, bucket_size=64),
        "Sharded-sib": lambda: ShardedAdamW(groups, step_in_backward=True, bucket_size=64),
        "Sharded-sib-clip": lambda: ShardedAdamW(groups, step_in_backward=True, max_grad_norm=0.5, bucket_size=64),
        "Sharded-adalomo": lambda: ShardedAdamW(groups, rule="adalomo", bucket_size=64),
        "Sharded-wd-schedule": lambda: ShardedAdamW(groups, wd_schedule="linear", wd_schedule_steps=12),
    }[kind]()


KINDS = ["AdamW", "AdamW-wd-schedule", "Sharded", "Sharded-stage1", "Sharded-sib", "Sharded-sib-clip",
         "Sharded-adalomo", "Sharded-wd-schedule"]


def fresh(seed: int = 0) -> MLP:
    torch.manual_seed(seed)
    return MLP()


# ------------------------------------------------------------------------- 1. state dicts, both directions
@pytest.mark.parametrize("impl", ["reference", "auto"])
@pytest.mark.parametrize("cls", [AdamW, ShardedAdamW])
def test_torch_adamw_state_dict_loads_and_training_continues_like_torch(cls, impl):
    """torch.optim.AdamW trains 5 steps; its state dict (no 'decay' / 'initial_lr' keys) loads into ours, and 20 more
    steps of both give the same params and state."""
    model = fresh()
    ref = torch.optim.AdamW(param_groups(model), **torch_pair(impl))
    train([(model, ref)], 5)
    twin = copy.deepcopy(model)
    opt = cls(param_groups(twin, lr=0.5, wd=0.3), impl=impl)  # other hyperparameters: the loaded ones must win
    opt.load_state_dict(copy.deepcopy(ref.state_dict()))  # (torch's load keeps the tensors it is given)
    for g, rg in zip(opt.param_groups, ref.param_groups):
        assert g["decay"] == "decoupled" and g["lr"] == rg["lr"] and g["weight_decay"] == rg["weight_decay"]
    train([(model, ref), (twin, opt)], 20, start=5)
    assert_same_params(twin, model)
    assert_same_state(opt.state_dict(), ref.state_dict())


@pytest.mark.parametrize("cls", [AdamW, ShardedAdamW])
def test_our_state_dict_loads_into_torch_adamw_and_training_continues(cls):
    """ours trains 5 steps; torch.optim.AdamW loads our state dict (through torch.save / weights_only load) and 20 more
    steps of both agree."""
    model = fresh()
    opt = cls(param_groups(model), impl="reference")
    train([(model, opt)], 5)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    twin = copy.deepcopy(model)
    ref = torch.optim.AdamW(param_groups(twin, lr=0.5), foreach=False)
    ref.load_state_dict(sd)
    train([(model, opt), (twin, ref)], 20, start=5)
    assert_same_params(model, twin)
    assert_same_state(opt.state_dict(), ref.state_dict())


def test_loaded_torch_groups_keep_this_optimizers_zeroadamw_keys():
    """Keys torch's groups lack take this optimizer's current values: decay, initial_lr, the wd-schedule keys."""
    model = fresh()
    ref = torch.optim.AdamW(param_groups(model), foreach=False)
    train([(model, ref)], 2)
    twin = copy.deepcopy(model)
    opt = AdamW(param_groups(twin), decay="independent", wd_schedule="linear", wd_schedule_steps=10)
    train([(twin, opt)], 3)
    before = [dict(g) for g in opt.param_groups]
    opt.load_state_dict(ref.state_dict())
    for g, b, rg in zip(opt.param_groups, before, ref.param_groups):
        assert g["decay"] == "independent"
        assert g["initial_lr"] == b["initial_lr"] and g["wd_step"] == b["wd_step"] == 3
        assert g["initial_weight_decay"] == b["initial_weight_decay"]
        assert g["weight_decay"] == rg["weight_decay"]  # the loaded value is the current lambda_t
    train([(twin, opt)], 2, start=2)  # steps and advances the schedule
    assert [g["wd_step"] for g in opt.param_groups] == [5, 5]


@pytest.mark.parametrize("bad,match", [(dict(lr=-1.0), "learning rate"), (dict(betas=(0.9, 1.5)), "beta"),
                                       (dict(decay="nope"), "decay mode"), (dict(amsgrad=True), "amsgrad")])
def test_loaded_groups_are_validated_before_anything_changes(bad, match):
    model = fresh()
    ref = torch.optim.AdamW(param_groups(model), foreach=False)
    train([(model, ref)], 2)
    sd = ref.state_dict()
    sd["param_groups"][1].update(bad)
    twin = copy.deepcopy(model)
    opt = AdamW(param_groups(twin))
    train([(twin, opt)], 1)
    groups = copy.deepcopy([{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups])
    state = copy.deepcopy(opt.state_dict()["state"])
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(sd)
    assert [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups] == groups
    assert_same_state(opt.state_dict(), {"state": state})


@pytest.mark.parametrize("cls", [AdamW, ShardedAdamW])
def test_state_dict_round_trip_into_a_fresh_optimizer_is_deterministic(cls):
    """torch's test_state_dict_deterministic: save, torch.load(weights_only=True), load into a fresh optimizer over
    a copy of the model; both continue identically."""
    model = fresh()
    opt = cls(param_groups(model))
    train([(model, opt)], 3)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    twin = copy.deepcopy(model)
    opt2 = cls(param_groups(twin))
    opt2.load_state_dict(torch.load(buf, weights_only=True))
    train([(model, opt), (twin, opt2)], 5, start=3)
    assert_same_params(twin, model)
    assert_same_state(opt2.state_dict(), opt.state_dict())


# ------------------------------------------------------------------------------------ 2. deepcopy and pickle
def _copy_pair(how: str, model, opt):
    if how == "deepcopy":
        return copy.deepcopy((model, opt))
    return pickle.loads(pickle.dumps((model, opt)))


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
@pytest.mark.parametrize("kind", KINDS)
def test_copy_steps_in_lockstep_with_the_original(kind, how):
    """A deep copy / unpickled copy of (model, optimizer) owns copied params, carries the state over, and stepping it
    equals stepping the original; the original is untouched by the copy's steps."""
    model = fresh()
    opt = build(kind, model)
    train([(model, opt)], 3)
    model2, opt2 = _copy_pair(how, model, opt)
    assert type(opt2) is type(opt)
    ours = {id(p) for g in opt.param_groups for p in g["params"]}
    assert not ours & {id(p) for g in opt2.param_groups for p in g["params"]}
    assert {id(p) for p in model2.parameters()} == {id(p) for g in opt2.param_groups for p in g["params"]}
    assert_identical_state(opt2.state_dict(), opt.state_dict())
    snapshot = copy.deepcopy(model.state_dict())
    train([(model2, opt2)], 2, start=3)  # the copy steps alone first: the original must not move
    for k, v in model.state_dict().items():
        assert torch.equal(v, snapshot[k])
    train([(model, opt)], 2, start=3)
    train([(model, opt), (model2, opt2)], 5, start=5)
    assert_same_params(model2, model)
    sd, sd2 = opt.state_dict(), opt2.state_dict()
    assert_identical_state(sd2, sd)
    assert [{k: v for k, v in g.items() if k != "params"} for g in sd2["param_groups"]] == \
        [{k: v for k, v in g.items() if k != "params"} for g in sd["param_groups"]]


@pytest.mark.parametrize("kw", [dict(), dict(step_in_backward=True)])
def test_pickled_bf16_sharded_adamw_keeps_its_fp32_master(kw):
    """bf16 params: the fp32 master (state the params don't show) travels with the copy; lockstep stays exact."""
    torch.manual_seed(0)
    model = MLP().to(torch.bfloat16)
    opt = ShardedAdamW(param_groups(model), bucket_size=64, **kw)

    def run(pairs, steps, start):
        for step in range(start, start + steps):
            for m, o in pairs:
                m.loss(mlp_batch(step, 0, dtype=torch.bfloat16)).backward()
                o.step()
                o.zero_grad()

    run([(model, opt)], 3, 0)
    model2, opt2 = pickle.loads(pickle.dumps((model, opt)))
    assert_identical_state(opt2.state_dict(), opt.state_dict())
    run([(model, opt), (model2, opt2)], 4, 3)
    assert_same_params(model2, model)
    assert_identical_state(opt2.state_dict(), opt.state_dict())


@pytest.mark.parametrize("kind", ["AdamW", "Sharded", "Sharded-sib"])
def test_deepcopy_copies_all_public_attrs(kind):
    """torch's test_deepcopy_copies_all_public_attrs, before and after a step."""
    model = fresh()
    opt = build(kind, model)

    def public(o):
        return {k for k in o.__dict__ if not k.startswith("_")}

    assert public(copy.deepcopy(opt)) == public(opt)
    train([(model, opt)], 1)
    cp = copy.deepcopy(opt)
    assert public(cp) == public(opt)
    for k in ("impl",) + (("stage", "bucket_size", "step_in_backward", "rule", "grad_norm", "skipped_steps",
                           "last_step_skipped") if kind != "AdamW" else ()):
        assert getattr(cp, k) == getattr(opt, k), k


def test_deepcopy_of_the_optimizer_alone_copies_its_params():
    """torch's contract: deepcopy(optimizer) copies the params too; the copy steps its own params only."""
    model = fresh()
    opt = ShardedAdamW(model.parameters(), step_in_backward=True)
    cp = copy.deepcopy(opt)
    params = [p for g in cp.param_groups for p in g["params"]]
    assert all(q is not p for q, p in zip(params, model.parameters()))
    before = [p.detach().clone() for p in model.parameters()]
    sum(p.sum() for p in params if p.requires_grad).backward()  # the copy's hooks update the copy in backward
    cp.step()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert any(not torch.equal(p, b) for p, b in zip(params, before))


def test_copy_refused_while_the_optimizer_holds_this_steps_gradients():
    """step_in_backward with clipping holds the reduced gradients between backward and step(): a copy then would
    silently drop them -- refused, naming what to do."""
    model = fresh()
    opt = ShardedAdamW(model.parameters(), step_in_backward=True, max_grad_norm=1.0)
    model.loss(mlp_batch(0, 0)).backward()
    with pytest.raises(TypeError, match="after step"):
        copy.deepcopy(opt)
    opt.step()
    copy.deepcopy(opt)


def test_copy_refused_for_subclasses_and_plain_mode():
    model = fresh()
    with pytest.raises(TypeError, match="state_dict"):
        copy.deepcopy(SparseAdamW(model.parameters()))
    opt = ShardedAdamW(model.parameters())
    opt.param_groups[0]["params"] = [torch.zeros(3, requires_grad=True)]  # DeepSpeed hands over its partitions
    opt.step()  # goes plain
    with pytest.raises(TypeError, match="state_dict"):
        pickle.dumps(opt)


def _copy_at_world_size_2(rank, world_size):
    model = fresh()
    opt = ShardedAdamW(model.parameters())
    for fn in (copy.deepcopy, pickle.dumps):
        try:
            fn(opt)
        except TypeError as e:
            assert "state_dict" in str(e) and "world size 2" in str(e), str(e)
        else:
            raise AssertionError(f"{fn.__name__} of a sharded ShardedAdamW did not raise")
    return True


@pytest.mark.dist
def test_copy_refused_when_sharded_over_two_ranks():
    from distributed import run

    assert run(_copy_at_world_size_2, 2, timeout=120) == [True, True]


# ------------------------------------------------------------------------------------------ 3. complex params
def _complex_params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(4, 3, dtype=torch.complex64, generator=g)),
            nn.Parameter(torch.randn(5, dtype=torch.complex64, generator=g)),
            nn.Parameter(torch.randn(6, generator=g))]  # a real param in the same group


@pytest.mark.parametrize("impl", ["auto", "fused", "foreach", "reference"])
@pytest.mark.parametrize("decay,torch_cls", [("decoupled", torch.optim.AdamW), ("l2", torch.optim.Adam)])
def test_complex_params_match_torch(impl, decay, torch_cls):
    """torch views complex params, grads and moments as real; state stays complex. 20 steps."""
    ours, theirs = _complex_params(), _complex_params()
    opt = AdamW(ours, lr=0.05, weight_decay=0.1, decay=decay, impl=impl)
    ref = torch_cls(theirs, lr=0.05, weight_decay=0.1, foreach=False)
    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        for p, q in zip(ours, theirs):
            grad = torch.randn(p.shape, dtype=p.dtype, generator=g)
            p.grad, q.grad = grad.clone(), grad.clone()
        opt.step()
        ref.step()
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-6)
        for k in STATE_KEYS:
            a, b = opt.state[p][k], ref.state[q][k]
            assert a.dtype == b.dtype
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_sharded_adamw_refuses_complex_params():
    with pytest.raises(TypeError, match="real floating-point"):
        ShardedAdamW(_complex_params())


# ------------------------------------------------------------------------------- 4. strided grads and params
def _strided_case(case: str, seed=0):
    g = torch.Generator().manual_seed(seed)
    if case == "transposed_grad":  # a contiguous param, a grad with other strides
        p = torch.randn(6, 4, generator=g)
        grad = torch.randn(4, 6, generator=g).t()
    elif case == "strided_param":  # the param itself is a strided view (a leaf)
        p = torch.randn(6, 8, generator=g)[:, ::2]
        grad = torch.randn(6, 4, generator=g)
    elif case == "both_transposed":  # same non-contiguous strides everywhere: dense, fused may take it
        p = torch.randn(4, 6, generator=g).t()
        grad = torch.randn(4, 6, generator=g).t()
    else:  # channels_last param and grad
        p = torch.randn(2, 3, 4, 5, generator=g).to(memory_format=torch.channels_last)
        grad = torch.randn(2, 3, 4, 5, generator=g).to(memory_format=torch.channels_last)
    return p, grad


def _clone_strided(t: torch.Tensor) -> torch.Tensor:
    """A copy with the same strides (gaps included)."""
    return torch.empty_strided(t.size(), t.stride(), dtype=t.dtype).copy_(t)


@pytest.mark.parametrize("impl", ["auto", "fused", "foreach", "reference"])
@pytest.mark.parametrize("case", ["transposed_grad", "strided_param", "both_transposed", "channels_last"])
def test_strided_grads_and_params_match_torch(case, impl):
    """A grad whose strides differ from its param's (or a strided-view param) must not go to the fused kernel
    unguarded; every impl equals torch.optim.AdamW(foreach=False)."""
    p0, g0 = _strided_case(case)
    p, q = _clone_strided(p0).requires_grad_(), _clone_strided(p0).requires_grad_()
    assert p.stride() == p0.stride()
    opt = AdamW([p], lr=0.1, weight_decay=0.1, impl=impl)
    ref = torch.optim.AdamW([q], lr=0.1, weight_decay=0.1, foreach=False)
    for step in range(5):
        gs = torch.Generator().manual_seed(step)
        grad = _clone_strided(g0).copy_(torch.randn(g0.shape, generator=gs))
        p.grad, q.grad = _clone_strided(grad), _clone_strided(grad)
        assert p.grad.stride() == g0.stride()
        opt.step()
        ref.step()
    torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-6)
    assert p.stride() == p0.stride()
    for k in STATE_KEYS:
        torch.testing.assert_close(opt.state[p][k], ref.state[q][k], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("impl", ["auto", "fused"])
def test_dispatch_with_a_state_tensor_of_another_layout(impl):
    """F.adamw: a moment whose strides differ from its param's (e.g. loaded from elsewhere) is updated right."""
    g = torch.Generator().manual_seed(0)
    p = torch.randn(5, 7, generator=g)
    grad = torch.randn(5, 7, generator=g)
    m = torch.randn(7, 5, generator=g).t().mul_(0.1)
    v = torch.rand(7, 5, generator=g).t().mul_(0.01)
    ref = [t.clone() for t in (p, grad, m, v)]
    kw = dict(lr=0.1, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1)
    F.adamw([p], [grad], [m], [v], [torch.zeros(())], impl=impl, **kw)
    F.adamw_reference([ref[0]], [ref[1]], [ref[2]], [ref[3]], [torch.zeros(())], **kw)
    for a, b in zip((p, m, v), (ref[0], ref[2], ref[3])):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    assert m.stride() == (1, 5)  # written back in place, layout kept


@pytest.mark.parametrize("case,want", [("transposed_grad", "foreach"), ("strided_param", "foreach"),
                                       ("both_transposed", "fused"), ("channels_last", "fused")])
def test_auto_picks_fused_only_for_one_dense_layout(case, want, monkeypatch):
    """impl="auto" keeps the fused kernel where all tensors share the param's dense layout, and leaves it otherwise."""
    called = []
    for name in ("fused", "foreach"):
        monkeypatch.setitem(F.KERNELS, name, lambda *a, _n=name, **k: called.append(_n))
    p, grad = _strided_case(case)
    m, v = torch.zeros_like(p), torch.zeros_like(p)
    F.adamw([p], [grad], [m], [v], [torch.zeros(())], lr=0.1, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.0)
    assert called == [want]


def test_sharded_adamw_with_a_transposed_grad_matches_torch():
    p0, g0 = _strided_case("transposed_grad")
    p, q = nn.Parameter(p0.clone()), nn.Parameter(p0.clone())
    opt = ShardedAdamW([p], lr=0.1, weight_decay=0.1)
    ref = torch.optim.AdamW([q], lr=0.1, weight_decay=0.1, foreach=False)
    for _ in range(5):
        p.grad, q.grad = g0.clone().t().contiguous().t(), g0.clone().t().contiguous().t()
        assert p.grad.stride() != p.stride()
        opt.step()
        ref.step()
    torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-6)


# ------------------------------------------------------------------------------------- 5. state-dict hooks
HOOK_KINDS = ["AdamW", "Sharded", "Sharded-sib"]


@pytest.mark.parametrize("kind", HOOK_KINDS)
def test_state_dict_pre_and_post_hooks(kind):
    """torch's order: pre-hooks (with prepend) before packing, post-hooks after; a post-hook's return value, when not
    None, replaces the state dict; removed hooks don't run."""
    model = fresh()
    opt = build(kind, model)
    train([(model, opt)], 1)
    calls = []

    def pre_a(o):
        calls.append("pre_a")
        o.param_groups[0]["lr"] = 0.125  # runs before packing: the state dict sees it

    def pre_b(o):
        calls.append("pre_b")

    def post_replace(o, sd):
        calls.append("post_replace")
        assert sd["param_groups"][0]["lr"] == 0.125
        new = dict(sd)
        new["ran_post_hook"] = True
        return new

    def post_none(o, sd):
        calls.append("post_none")
        assert sd.get("ran_post_hook")
        sd["state"].setdefault("extra", 1)

    opt.register_state_dict_pre_hook(pre_a)
    hb = opt.register_state_dict_pre_hook(pre_b, prepend=True)
    opt.register_state_dict_post_hook(post_none)
    opt.register_state_dict_post_hook(post_replace, prepend=True)
    sd = opt.state_dict()
    assert calls == ["pre_b", "pre_a", "post_replace", "post_none"]
    assert sd["ran_post_hook"] and sd["state"]["extra"] == 1 and sd["param_groups"][0]["lr"] == 0.125
    hb.remove()
    calls.clear()
    opt.state_dict()
    assert calls == ["pre_a", "post_replace", "post_none"]


@pytest.mark.parametrize("kind", HOOK_KINDS)
def test_load_state_dict_pre_and_post_hooks(kind):
    """torch's test_load_state_dict_pre_hook_and_prepend / post_hook: pre-hooks get a shallow copy, may edit it or
    return a new one (used from then on), in registration order (prepend first); post-hooks run after loading."""
    model = fresh()
    opt = build(kind, model)
    train([(model, opt)], 2)
    sd = opt.state_dict()
    twin = copy.deepcopy(model)
    opt2 = build(kind, twin)
    calls = []

    def pre_inplace(o, state_dict):
        calls.append("pre_inplace")
        state_dict["param_groups"][0]["lr"] = 0.002
        state_dict["top_level_edit"] = True  # the caller's dict must not see this (a shallow copy)

    def pre_replace(o, state_dict):
        calls.append("pre_replace")
        new = copy.deepcopy(state_dict)
        new["param_groups"][0]["lr"] = 0.003
        return new

    def post(o):
        calls.append("post")
        o.ran_post_hook_lr = o.param_groups[0]["lr"]

    h1 = opt2.register_load_state_dict_pre_hook(pre_inplace)
    h2 = opt2.register_load_state_dict_pre_hook(pre_replace)
    opt2.register_load_state_dict_post_hook(post)
    given = copy.deepcopy(sd)
    opt2.load_state_dict(given)
    assert calls == ["pre_inplace", "pre_replace", "post"]
    assert opt2.param_groups[0]["lr"] == 0.003 and opt2.ran_post_hook_lr == 0.003
    assert "top_level_edit" not in given
    # prepend: pre_replace first, then pre_inplace edits the dict pre_replace returned
    h1.remove()
    h2.remove()
    calls.clear()
    opt2.register_load_state_dict_pre_hook(pre_inplace)
    opt2.register_load_state_dict_pre_hook(pre_replace, prepend=True)
    opt2.load_state_dict(copy.deepcopy(sd))
    assert calls == ["pre_replace", "pre_inplace", "post"]
    assert opt2.param_groups[0]["lr"] == 0.002 and opt2.ran_post_hook_lr == 0.002
    # the loaded state itself is what was saved
    assert_identical_state(opt2.state_dict(), sd)


def test_sharded_plain_mode_runs_each_state_dict_hook_once():
    """As DeepSpeed's client, ShardedAdamW delegates to torch's state_dict: its hooks still run exactly once."""
    model = fresh()
    opt = ShardedAdamW(model.parameters())
    opt.param_groups[0]["params"] = [torch.zeros(3, requires_grad=True)]
    opt.step()
    calls = []
    opt.register_state_dict_pre_hook(lambda o: calls.append("pre"))
    opt.register_state_dict_post_hook(lambda o, sd: calls.append("post"))
    opt.register_load_state_dict_pre_hook(lambda o, sd: calls.append("load_pre"))
    opt.register_load_state_dict_post_hook(lambda o: calls.append("load_post"))
    opt.load_state_dict(opt.state_dict())
    assert calls == ["pre", "post", "load_pre", "load_post"]


# -------------------------------------------------------------------------- 6. float step in old state dicts
@pytest.mark.parametrize("cls", [AdamW, ShardedAdamW])
def test_float_step_in_an_old_state_dict(cls):
    """torch's test_load_nontensor_step: old torch stored ``step`` as a Python float. It loads as a 0-d float32
    tensor on the param's device and training continues like torch."""
    model = fresh()
    ref = torch.optim.AdamW(param_groups(model), foreach=False)
    train([(model, ref)], 3)
    sd = copy.deepcopy(ref.state_dict())  # (torch's state_dict() returns its live state)
    for st in sd["state"].values():
        st["step"] = st["step"].item()
    twin = copy.deepcopy(model)
    opt = cls(param_groups(twin), impl="reference")
    opt.load_state_dict(copy.deepcopy(sd))
    for p, st in opt.state.items():
        assert isinstance(st["step"], torch.Tensor) and st["step"].dtype == torch.float32
        assert st["step"].shape == () and st["step"].device == p.device
    ref.load_state_dict(sd)  # torch itself accepts it
    train([(model, ref), (twin, opt)], 5, start=3)
    assert_same_params(twin, model)
    assert_same_state(opt.state_dict(), ref.state_dict())


def test_float_step_in_plain_mode():
    """ShardedAdamW as DeepSpeed's client loads through torch's load_state_dict: the plain step takes a float step."""
    p = torch.randn(6, requires_grad=True)
    q = p.detach().clone().requires_grad_()
    opt = ShardedAdamW([torch.zeros(2, requires_grad=True)])
    opt.param_groups[0]["params"] = [p]
    ref = torch.optim.AdamW([q], foreach=False)
    p.grad, q.grad = torch.ones(6), torch.ones(6)
    ref.step()
    opt.step()  # plain from here
    sd = copy.deepcopy(ref.state_dict())
    sd["state"][0]["step"] = float(sd["state"][0]["step"])
    opt.load_state_dict(copy.deepcopy(sd))
    ref.load_state_dict(sd)
    opt.step()
    ref.step()
    torch.testing.assert_close(p, q, atol=0, rtol=0)
    assert isinstance(opt.state[p]["step"], torch.Tensor)


# ------------------------------------------------------------------------------------------ generic checks
@pytest.mark.parametrize("set_to_none", [True, False])
@pytest.mark.parametrize("kind", ["AdamW", "Sharded", "Sharded-stage1"])
def test_zero_grad(kind, set_to_none):
    model = fresh()
    opt = build(kind, model)
    model.loss(mlp_batch(0, 0)).backward()
    opt.zero_grad(set_to_none=set_to_none)
    for p in model.parameters():
        if set_to_none or not p.requires_grad or p is model.unused:
            assert p.grad is None
        else:
            assert p.grad is not None and not p.grad.any()
    train([(model, opt)], 2)  # and training goes on


@pytest.mark.parametrize("kind", ["AdamW", "Sharded"])
def test_add_param_group_after_steps_matches_torch(kind):
    model = fresh()
    twin = copy.deepcopy(model)
    groups = param_groups(model)
    later = groups.pop()
    opt = AdamW(groups, impl="reference") if kind == "AdamW" else ShardedAdamW(groups, impl="reference")
    tgroups = param_groups(twin)
    tlater = tgroups.pop()
    ref = torch.optim.AdamW(tgroups, foreach=False)
    train([(model, opt), (twin, ref)], 3)
    opt.add_param_group(later)
    ref.add_param_group(tlater)
    train([(model, opt), (twin, ref)], 5, start=3)
    assert_same_params(model, twin)
    assert_same_state(opt.state_dict(), ref.state_dict())


@pytest.mark.parametrize("sched", ["StepLR", "LambdaLR"])
@pytest.mark.parametrize("kind", ["AdamW", "Sharded", "Sharded-sib"])
def test_lr_scheduler_drives_lr_like_torch(kind, sched):
    model = fresh()
    twin = copy.deepcopy(model)
    opt = {"AdamW": lambda: AdamW(param_groups(model), impl="reference"),
           "Sharded": lambda: ShardedAdamW(param_groups(model), impl="reference"),
           "Sharded-sib": lambda: ShardedAdamW(param_groups(model), impl="reference", step_in_backward=True)}[kind]()
    ref = torch.optim.AdamW(param_groups(twin), foreach=False)

    def make(o):
        if sched == "StepLR":
            return torch.optim.lr_scheduler.StepLR(o, step_size=3, gamma=0.5)
        return torch.optim.lr_scheduler.LambdaLR(o, [lambda t: 1 / (1 + t), lambda t: 0.9**t])

    s, rs = make(opt), make(ref)
    for step in range(8):
        train([(model, opt), (twin, ref)], 1, start=step, scheds=(s, rs))
        assert [g["lr"] for g in opt.param_groups] == [g["lr"] for g in ref.param_groups]
        assert s.get_last_lr() == rs.get_last_lr()
    assert_same_params(model, twin)


@pytest.mark.parametrize("kind", ["AdamW", "Sharded", "Sharded-sib"])
def test_step_pre_and_post_hooks_fire(kind):
    """register_step_pre_hook / register_step_post_hook (and the global ones) fire once per step, in order; a pre-hook
    may replace step's arguments."""
    model = fresh()
    opt = build(kind, model)
    calls = []
    closure_ran = []

    def closure():
        closure_ran.append(1)
        return torch.tensor(1.0)

    def pre(o, args, kwargs):
        assert o is opt
        calls.append("pre")
        return args, {"closure": closure}

    h1 = opt.register_step_pre_hook(pre)
    h2 = opt.register_step_post_hook(lambda o, args, kwargs: calls.append(("post", "closure" in kwargs)))
    g1 = register_optimizer_step_pre_hook(lambda o, a, k: calls.append("global_pre"))
    g2 = register_optimizer_step_post_hook(lambda o, a, k: calls.append("global_post"))
    try:
        model.loss(mlp_batch(0, 0)).backward()
        loss = opt.step()
    finally:
        g1.remove()
        g2.remove()
    assert calls == ["global_pre", "pre", ("post", True), "global_post"]
    assert closure_ran == [1] and float(loss) == 1.0
    h1.remove()
    h2.remove()
    calls.clear()
    opt.step()
    assert calls == []


@pytest.mark.parametrize("kind", ["AdamW", "Sharded"])
def test_tensor_lr_matches_torch(kind):
    """lr given as a 0-d tensor, driven by a scheduler (which writes it in place)."""
    model = fresh()
    twin = copy.deepcopy(model)
    cls = AdamW if kind == "AdamW" else ShardedAdamW
    opt = cls(model.parameters(), lr=torch.tensor(0.01), impl="reference")
    ref = torch.optim.AdamW(twin.parameters(), lr=torch.tensor(0.01), foreach=False)
    s = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    rs = torch.optim.lr_scheduler.StepLR(ref, step_size=2, gamma=0.5)
    train([(model, opt), (twin, ref)], 6, scheds=(s, rs))
    assert isinstance(opt.param_groups[0]["lr"], torch.Tensor)
    assert_same_params(model, twin, atol=1e-6)  # torch computes lr / bias_correction1 in float32 here


@pytest.mark.parametrize("kind", ["AdamW", "Sharded"])
def test_tensor_lr_keeps_its_own_initial_lr(kind):
    """decay='independent' divides by initial_lr: a scheduler writing a tensor lr in place must not move it (the
    tensor and the float run are the same run)."""
    cls = AdamW if kind == "AdamW" else ShardedAdamW
    a, b = fresh(), fresh()
    runs = []
    for model, lr in ((a, torch.tensor(0.01)), (b, 0.01)):
        opt = cls(model.parameters(), lr=lr, weight_decay=0.5, decay="independent", impl="reference")
        runs.append((model, opt, torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)))
    for step in range(4):
        train([(m, o) for m, o, _ in runs], 1, start=step, scheds=[s for _, _, s in runs])
    assert float(runs[0][1].param_groups[0]["initial_lr"]) == pytest.approx(0.01)
    assert_same_params(a, b, atol=1e-7)


def test_sparse_adamw_step_hooks_fire_once():
    """torch wraps every Optimizer subclass's step() with the hook machinery; a subclass whose step() called
    super().step() ran the hooks twice."""
    from zeroadamw import SparseAdamW

    ShardedAdamW([torch.nn.Parameter(torch.zeros(2))])  # the parent class's step is patched too
    w = torch.nn.Parameter(torch.randn(3, 2))
    opt = SparseAdamW([{"params": [w], "sparse": "rows"}], lr=1e-2)
    calls = []
    opt.register_step_pre_hook(lambda *a: calls.append("pre"))
    opt.register_step_post_hook(lambda *a: calls.append("post"))
    w.sum().backward()
    opt.step()
    assert calls == ["pre", "post"]
