"""The CUDA tier: ShardedAdamW / SparseAdamW on a CUDA device, against torch.optim.AdamW(fused=True).

Every test here is marked ``cuda`` and is *skipped* -- reported as skipped, with the reason :data:`NO_GPU` -- where
``torch.cuda.is_available()`` is False (conftest.py then prints "cuda tier: N tests not run (no GPU)"). On a GPU
machine run ``bash scripts/gpu_check.sh`` (this file plus the measurements, one report) or
``pytest -q -m cuda tests/test_cuda.py``. See docs/gpu.md.

Each test body is a ``check_*(device, ...)`` function that takes the device as an argument, so the logic can be
exercised on CPU too (the comparisons are device-independent); only the tests themselves require CUDA.

Gradients are fed identically to both optimizers (computed once, copied to the reference) wherever the
comparison is exact, so a non-deterministic cuBLAS/cuDNN reduction cannot make an exact test flaky.
"""

from __future__ import annotations

import contextlib
import copy
import os
import socket
import traceback

import pytest
import torch
from torch import nn

from distributed import run
from helpers import MLP, mlp_batch, param_groups, rel_err
import zeroadamw
from zeroadamw import ShardedAdamW, SparseAdamW

NO_GPU = "no CUDA device: not run on a GPU"
HAS_CUDA = torch.cuda.is_available()

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason=NO_GPU)]


# ------------------------------------------------------------------------------------------------- helpers
def _mlp(device, dtype=torch.float32, seed: int = 0) -> MLP:
    torch.manual_seed(seed)
    return MLP().to(device=device, dtype=dtype)


def _batch(step: int, device, dtype=torch.float32, rank: int = 0):
    x, y = mlp_batch(step, rank)
    return x.to(device=device, dtype=dtype), y.to(device=device, dtype=dtype)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _copy_grads(src: nn.Module | list, dst: list) -> None:
    """``dst[i].grad = src[i].grad`` (cloned, cast to ``dst[i]``'s dtype); ``None`` stays ``None``."""
    src = list(src.parameters()) if isinstance(src, nn.Module) else list(src)
    for p, q in zip(src, dst, strict=True):
        q.grad = None if p.grad is None else p.grad.detach().to(q.dtype, copy=True)


def _max_abs(a, b) -> float:
    return max(((x.detach().double().cpu() - y.detach().double().cpu()).abs().max().item()
                for x, y in zip(a, b, strict=True) if x.numel()), default=0.0)


def _n_buckets(opt: ShardedAdamW) -> int:
    """How many communication buckets ``opt`` built (the engine's list; else the documented packing rule)."""
    buckets = getattr(getattr(opt, "engine", None), "buckets", None)
    if buckets is not None:
        return len(buckets)
    from zeroadamw.layout import plan_buckets

    n = 0
    for g in opt.param_groups:
        by_dtype: dict = {}
        for p in [p for p in g["params"] if p.requires_grad and p.numel()][::-1]:
            by_dtype.setdefault(p.dtype, []).append(p.numel())
        n += sum(len(plan_buckets(v, opt.bucket_size)) for v in by_dtype.values())
    return n


@contextlib.contextmanager
def sync_errors(device):
    """Inside: any CUDA host<->device synchronisation raises (``torch.cuda.set_sync_debug_mode("error")``).
    A no-op off CUDA."""
    if torch.device(device).type != "cuda":
        yield
        return
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(0)


def _compare_state(opt, topt, ours: list, theirs: list, exact: bool, keys=("exp_avg", "exp_avg_sq")) -> None:
    """Params' optimizer state: ours (flat views of the owned shard; N = 1 owns all) vs torch's (param shaped)."""
    for i, (p, q) in enumerate(zip(ours, theirs, strict=True)):
        if q not in topt.state:  # torch never stepped it (no gradient): ours must not have either
            if p in opt.state:
                assert float(opt.state[p]["step"].max()) == 0, f"param {i}: stepped without a gradient"
            continue
        mine, ref = opt.state[p], topt.state[q]
        assert float(mine["step"]) == float(ref["step"]), (i, float(mine["step"]), float(ref["step"]))
        for k in keys:
            a, b = mine[k].reshape(-1), ref[k].reshape(-1)
            assert a.device == b.device, (i, k, a.device, b.device)
            if exact:
                assert torch.equal(a, b), f"param {i} {k}: max diff {(a.double() - b.double()).abs().max().item()}"
            else:  # relative to the tensor's scale: elementwise rtol is meaningless where a moment crosses zero
                assert rel_err(a, b) <= 1e-6, f"param {i} {k}: relative difference {rel_err(a, b)}"


# ------------------------------------------------------------------------------------ checks (device-generic)
def check_matches_torch_fused(device, stage: int, impl: str, steps: int = 30) -> float:
    """fp32 params, two param groups, frozen and never-used params; 30 steps. Returns the max param difference."""
    model = _mlp(device)
    ref = copy.deepcopy(model)
    opt = ShardedAdamW(param_groups(model), stage=stage, impl=impl, bucket_size=64)
    topt = torch.optim.AdamW(param_groups(ref), fused=True)
    ours, theirs = list(model.parameters()), list(ref.parameters())
    exact = impl == "fused"  # the same kernel (torch._fused_adamw_) with the same arguments
    for step in range(steps):
        model.loss(_batch(step, device)).backward()
        _copy_grads(ours, theirs)
        opt.step()
        topt.step()
        opt.zero_grad()
        topt.zero_grad()
    for i, (p, q) in enumerate(zip(ours, theirs)):
        assert p.device == q.device
        if exact:
            assert torch.equal(p, q), f"param {i}: max diff {(p - q).abs().max().item()}"
        else:
            assert rel_err(p, q) <= 1e-6, f"param {i}: relative difference {rel_err(p, q)}"
    _compare_state(opt, topt, ours, theirs, exact)
    return _max_abs(ours, theirs)


def check_bf16_master(device, stage: int, steps: int = 30) -> float:
    """bf16 params + fp32 master shard vs torch AdamW over fp32 copies fed the same (bf16 -> fp32) gradients:
    master == the fp32 copy and the bf16 param == master.to(bf16), exactly."""
    model = _mlp(device, torch.bfloat16)
    ours = list(model.parameters())
    masters = {p: p.detach().float().clone().requires_grad_(p.requires_grad) for p in ours}
    groups = param_groups(model)
    ref_groups = [dict(g, params=[masters[p] for p in g["params"]]) for g in groups]
    opt = ShardedAdamW(groups, stage=stage, master_dtype=torch.float32, bucket_size=64)
    topt = torch.optim.AdamW(ref_groups, fused=True)
    theirs = [masters[p] for p in ours]
    for step in range(steps):
        model.loss(_batch(step, device, torch.bfloat16)).backward()
        _copy_grads(ours, theirs)
        opt.step()
        topt.step()
        opt.zero_grad()
        topt.zero_grad()
    for i, (p, m) in enumerate(zip(ours, theirs)):
        if not p.requires_grad or m not in topt.state:
            continue
        mine = opt.state[p]["master"].reshape(-1)
        assert mine.dtype == torch.float32 and mine.device == m.device
        assert torch.equal(mine, m.detach().reshape(-1)), f"param {i}: master differs by {(mine - m.reshape(-1)).abs().max().item()}"
        assert torch.equal(p.detach().reshape(-1), mine.to(torch.bfloat16)), f"param {i}: bf16 param != master.to(bf16)"
    _compare_state(opt, topt, ours, theirs, exact=True)
    stepped = [p for p in ours if masters[p] in topt.state]
    return _max_abs([opt.state[p]["master"] for p in stepped], [masters[p].reshape(-1) for p in stepped])


def _tiny_llama(device, seed: int = 0):
    from helpers import tiny_llama

    return tiny_llama(seed).to(device)


def check_llama_backward_alone_is_sync_free(device) -> None:
    """Control for the next check: the model's own backward (no optimizer hooks) does not synchronise, so a sync
    error there is ours."""
    from helpers import llama_batch, llama_loss

    model = _tiny_llama(device)
    loss = llama_loss(model, llama_batch(0, 0).to(device))
    with sync_errors(device):
        loss.backward()


def _first_sync_site(device, bucket_size: int) -> str | None:
    """One fused step-in-backward backward of a fresh model under sync-debug "error": where it first synchronised
    (``file:line function: message`` of the innermost zeroadamw frame), or None. The first backward is allowed to
    synchronise (state allocation; control vectors first copied to the device are cached from then on): this is
    reported, not asserted."""
    from helpers import llama_batch, llama_loss

    if torch.device(device).type != "cuda":
        return None
    model = _tiny_llama(device)
    opt = ShardedAdamW(model.parameters(), lr=2e-3, weight_decay=0.1, bucket_size=bucket_size, step_in_backward=True)
    loss = llama_loss(model, llama_batch(0, 0).to(device))
    try:
        with sync_errors(device):
            loss.backward()
    except RuntimeError as e:
        return _where(e)
    finally:
        del opt
    return None


def _where(e: BaseException) -> str:
    """``file:line function: first line of the message`` for the innermost zeroadamw frame of ``e``'s traceback."""
    pkg = os.path.dirname(os.path.abspath(zeroadamw.__file__)) + os.sep
    ours = [f for f in traceback.extract_tb(e.__traceback__) if os.path.abspath(f.filename).startswith(pkg)]
    where = f"{os.path.basename(ours[-1].filename)}:{ours[-1].lineno} {ours[-1].name}" if ours else "(no zeroadamw frame)"
    msg = str(e).strip().splitlines()
    return f"{where}: {msg[0] if msg else type(e).__name__}"


def check_step_in_backward_sync_free(device, steps: int = 5, bucket_size: int = 1024) -> dict:
    """ShardedAdamW(step_in_backward=True), adamw, no clipping, N = 1: every backward after the first (warm-up)
    runs under sync-debug "error" (no host read of a device value, no blocking copy, in any hook) and the params
    equal stage 2 (update at step()) to 1e-6 after every step. Also reports where the first backward syncs."""
    from helpers import llama_batch, llama_loss

    a = _tiny_llama(device)
    b = copy.deepcopy(a)
    kw = dict(lr=2e-3, weight_decay=0.1, bucket_size=bucket_size)
    sib = ShardedAdamW(a.parameters(), step_in_backward=True, **kw)
    ref = ShardedAdamW(b.parameters(), stage=2, step_in_backward=False, **kw)
    assert _n_buckets(sib) >= 8, f"only {_n_buckets(sib)} buckets: lower bucket_size"
    worst = 0.0
    for step in range(steps):
        ids = llama_batch(step, 0).to(device)
        loss = llama_loss(a, ids)
        with sync_errors(device) if step > 0 else contextlib.nullcontext():
            loss.backward()
        sib.step()
        sib.zero_grad()
        llama_loss(b, ids).backward()
        ref.step()
        ref.zero_grad()
        worst = max(worst, _max_abs(a.parameters(), b.parameters()))
        assert worst <= 1e-6, f"step {step}: step in backward differs from stage 2 by {worst}"
    return {"max_abs_diff": worst, "first_step_sync": _first_sync_site(device, bucket_size)}


def check_precision_modes_sync_free(device, steps: int = 5) -> dict:
    """int8 / bf16 moments and Kahan bf16 weights, N = 1: the fused step in backward runs every backward after
    the first under sync-debug "error" and equals step() with the same storage; the run on ``device`` follows
    the CPU run of the same mode (another kernel: to float tolerance)."""
    from precision_workers import HP, MODES, batch, loss_of, make_net

    worst = {}
    for mode in ("int8", "kahan_int8", "bf16_moments"):
        dtype, opts = MODES[mode]
        nets = [make_net(dtype).to(device) for _ in range(2)] + [make_net(dtype)]
        opts_ = [ShardedAdamW(nets[0].parameters(), **HP, **opts, step_in_backward=True),
                 ShardedAdamW(nets[1].parameters(), **HP, **opts),
                 ShardedAdamW(nets[2].parameters(), **HP, **opts)]
        for step in range(steps):
            for i, (net, opt) in enumerate(zip(nets, opts_)):
                ids = batch(step).to(next(net.parameters()).device)
                loss = loss_of(net, ids)
                with sync_errors(device) if (step > 0 and i == 0) else contextlib.nullcontext():
                    loss.backward()
                opt.step()
                opt.zero_grad()
        assert _max_abs(nets[0].parameters(), nets[1].parameters()) <= 1e-6, mode
        worst[mode] = _max_abs([p.cpu() for p in nets[1].parameters()], nets[2].parameters())
        assert worst[mode] <= (2e-2 if dtype == "bfloat16" else 1e-4), (mode, worst[mode])
    return worst


def check_single_rank_process_group(device, backend: str | None, steps: int = 3) -> str:
    """In-process ``init_process_group`` with one rank; ShardedAdamW stage 2 (default group and the explicit
    WORLD group) equals torch AdamW; SparseAdamW with a rows group over ``new_group([0])`` steps. Returns what
    ``dist.get_backend()`` reported."""
    import torch.distributed as dist

    kw = {} if backend is None else {"backend": backend}
    if torch.device(device).type == "cuda":
        torch.cuda.set_device(torch.device(device).index or 0)
    dist.init_process_group(**kw, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        reported = str(dist.get_backend())
        base = _mlp(device)
        for pg in (None, dist.group.WORLD):
            model, ref = copy.deepcopy(base), copy.deepcopy(base)
            opt = ShardedAdamW(param_groups(model), stage=2, bucket_size=64, process_group=pg)
            assert opt.comm.world_size == 1, opt.comm
            topt = torch.optim.AdamW(param_groups(ref), fused=True)
            ours, theirs = list(model.parameters()), list(ref.parameters())
            for step in range(steps):
                model.loss(_batch(step, device)).backward()
                _copy_grads(ours, theirs)
                opt.step()
                topt.step()
                opt.zero_grad()
                topt.zero_grad()
            for i, (p, q) in enumerate(zip(ours, theirs)):
                assert torch.equal(p, q), f"process_group={pg}, param {i}: differs by {(p - q).abs().max().item()}"

        torch.manual_seed(1)
        emb = nn.Embedding(50, 8).to(device)  # dense gradient, zero rows for unused tokens
        coo = nn.Embedding(40, 8, sparse=True).to(device)  # torch sparse COO gradient
        head = nn.Linear(8, 3).to(device)
        group = dist.new_group([0])
        opt = SparseAdamW([{"params": [emb.weight, coo.weight], "sparse": "rows", "process_group": group},
                           {"params": list(head.parameters())}], lr=1e-2, weight_decay=0.1)
        before_emb, before_coo = emb.weight.detach().clone(), coo.weight.detach().clone()
        used = torch.zeros(50, dtype=torch.bool)
        for step in range(steps):
            g = torch.Generator().manual_seed(step)
            ids = torch.randint(0, 20, (4, 6), generator=g)  # rows 20.. never used
            used[ids.unique()] = True
            x = emb(ids.to(device)) + coo(ids.to(device) % 40)
            head(x).square().mean().backward()
            opt.step()
            opt.zero_grad()
        for t in (emb.weight, coo.weight, *head.parameters()):
            assert torch.isfinite(t).all()
        moved = (emb.weight.detach() != before_emb).any(dim=1).cpu()
        assert moved[used].all() and not moved[~used].any(), "SparseAdamW moved untouched rows or missed touched ones"
        assert (coo.weight.detach() != before_coo).any()
        return reported
    finally:
        dist.destroy_process_group()


def two_rank_worker(rank: int, world_size: int, device: str, steps: int = 10) -> dict:
    """Each rank: the same model on ``device`` (cuda:0 for every rank: gloo, two ranks sharing one GPU), its own
    data; ShardedAdamW vs torch AdamW(fused) on the rank-averaged gradients, computed here from every rank's data."""
    if torch.device(device).type == "cuda":
        torch.cuda.set_device(0)
        device = "cuda:0"
    out = {}
    for name, kw in (("stage2", dict(stage=2)), ("step_in_backward", dict(stage=2, step_in_backward=True))):
        model = _mlp(device)
        ref = copy.deepcopy(model)
        opt = ShardedAdamW(param_groups(model), bucket_size=64, **kw)
        topt = torch.optim.AdamW(param_groups(ref), fused=True)
        theirs = list(ref.parameters())
        for step in range(steps):
            model.loss(_batch(step, device, rank=rank)).backward()
            opt.step()
            opt.zero_grad()
            total = [None] * len(theirs)
            for r in range(world_size):
                ref.zero_grad()
                ref.loss(_batch(step, device, rank=r)).backward()
                for i, q in enumerate(theirs):
                    if q.grad is not None:
                        total[i] = q.grad.clone() if total[i] is None else total[i].add_(q.grad)
            for q, t in zip(theirs, total):
                q.grad = None if t is None else t.div_(world_size)
            topt.step()
            topt.zero_grad()
        out[name] = {"err": _max_abs(model.parameters(), theirs), "backend": str(opt.comm.backend),
                     "world_size": opt.comm.world_size, "device": str(next(model.parameters()).device),
                     "params": [p.detach().cpu().clone() for p in model.parameters()]}
    return out


def check_two_ranks(device, steps: int = 10, timeout: float = 100.0) -> dict:
    results = run(two_rank_worker, 2, device, steps, timeout=timeout)  # below the per-test limit (120 s)
    errs = {}
    for name in results[0]:
        for r, res in enumerate(results):
            assert res[name]["world_size"] == 2, res[name]
            assert res[name]["err"] <= 1e-5, f"{name}, rank {r}: differs from torch AdamW by {res[name]['err']}"
            assert torch.device(res[name]["device"]).type == torch.device(device).type, res[name]["device"]
        for i, (p, q) in enumerate(zip(results[0][name]["params"], results[1][name]["params"])):
            assert torch.equal(p, q), f"{name}: ranks 0 and 1 hold different values of param {i}"
        errs[name] = max(res[name]["err"] for res in results)
    return errs


MOVE_VARIANTS = {
    "stage1": dict(stage=1),
    "stage2": dict(stage=2),
    "step_in_backward": dict(stage=2, step_in_backward=True),  # last: a failure here may poison the CUDA context
}


def check_moved_model(kw: dict, src, dst, steps: int = 5, move_at: int = 2) -> dict:
    """Model + ShardedAdamW built on ``src``, ``move_at`` steps there, ``model.to(dst)``, the rest on ``dst`` vs the
    same run on ``dst`` from the start (fp64, so the device change costs no precision). The state follows."""
    torch.manual_seed(0)
    base = MLP().double()
    a, b = copy.deepcopy(base).to(src), copy.deepcopy(base).to(dst)
    oa = ShardedAdamW(param_groups(a), bucket_size=64, **kw)
    ob = ShardedAdamW(param_groups(b), bucket_size=64, **kw)
    for step in range(steps):
        if step == move_at:
            a.to(dst)
        for m, o in ((a, oa), (b, ob)):
            dev = next(m.parameters()).device
            m.loss(_batch(step, dev, torch.float64)).backward()
            o.step()
            o.zero_grad()
    err = max(((p.detach() - q.detach()).abs().max() / q.detach().abs().max().clamp_min(1e-30)).item()
              for p, q in zip(a.parameters(), b.parameters()))
    dst_type = torch.device(dst).type
    misplaced = sorted(f"param {i} {k}: {t.device}" for i, p in enumerate(a.parameters()) if p in oa.state
                       for k, t in oa.state[p].items() if torch.is_tensor(t) and t.device.type != dst_type)
    return {"err": err, "misplaced": misplaced}


def moved_worker(rank: int, world_size: int, src, dst) -> dict:
    """All move variants in one fresh process (a CPU tensor reaching a CUDA kernel can leave a sticky CUDA error:
    it must not take the rest of the test session down with it). Returns per variant a result or a traceback."""
    out = {}
    for name, kw in MOVE_VARIANTS.items():
        try:
            out[name] = {"ok": True, **check_moved_model(kw, src, dst)}
        except Exception:  # noqa: BLE001 - reported per variant to the parent
            out[name] = {"ok": False, "error": traceback.format_exc()}
    return out


# ---------------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("impl", ["fused", "foreach"])
@pytest.mark.parametrize("stage", [1, 2])
def test_fp32_matches_torch_fused_adamw(stage, impl):
    check_matches_torch_fused("cuda", stage, impl)


@pytest.mark.parametrize("stage", [1, 2])
def test_bf16_master_matches_torch_adamw_on_fp32_copies(stage):
    check_bf16_master("cuda", stage)


def test_llama_backward_alone_is_sync_free():
    check_llama_backward_alone_is_sync_free("cuda")


def test_step_in_backward_does_not_sync_and_equals_stage2(record_property):
    res = check_step_in_backward_sync_free("cuda")
    record_property("max_abs_diff", res["max_abs_diff"])
    record_property("first_step_sync", res["first_step_sync"] or "none")


def test_precision_modes_step_in_backward_sync_free(record_property):
    for mode, d in check_precision_modes_sync_free("cuda").items():
        record_property(f"max_abs_vs_cpu_{mode}", d)


@pytest.mark.parametrize("backend", ["nccl", None, "cpu:gloo,cuda:nccl"], ids=["nccl", "no-backend", "cpu-gloo-cuda-nccl"])
def test_single_rank_process_group_on_cuda(backend, record_property):
    reported = check_single_rank_process_group("cuda", backend)
    record_property("get_backend", reported)


def test_two_ranks_share_one_gpu_over_gloo(record_property):
    errs = check_two_ranks("cuda")
    for k, v in errs.items():
        record_property(f"max_err_{k}", v)


@pytest.fixture(scope="module")
def moved_results():
    return run(moved_worker, 1, "cpu", "cuda", init=False, timeout=100)[0]  # below the per-test limit


@pytest.mark.parametrize("variant", list(MOVE_VARIANTS))
def test_model_moved_to_cuda_after_state_exists(variant, moved_results, record_property):
    res = moved_results[variant]
    assert res["ok"], res.get("error")
    record_property("rel_err", res["err"])
    assert not res["misplaced"], f"optimizer state left behind on the old device: {res['misplaced']}"
    assert res["err"] <= 1e-9, f"differs from the run on CUDA from the start by {res['err']}"
