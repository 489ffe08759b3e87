"""Per-rank bodies of the multi-process tests (run by tests/distributed.py in spawned gloo processes)."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from helpers import (
    MLP,
    clone_model,
    llama_batch,
    llama_loss,
    loss_fn,
    max_state_err,
    mlp_batch,
    no_sync_if,
    param_groups,
    reference_grads,
    rel_err,
    tiny_llama,
)
from zeroadamw import ShardedAdamW


def assert_ranks_identical(tensors) -> None:
    """Every rank holds bit-identical tensors (compared against rank 0's)."""
    if not dist.is_initialized():
        return
    flat = torch.cat([t.detach().reshape(-1).float() for t in tensors])
    ref = flat.clone()
    dist.broadcast(ref, 0)
    if not torch.equal(flat, ref):
        raise AssertionError(f"rank {dist.get_rank()} params differ from rank 0 by {(flat - ref).abs().max().item()}")


def averaged_grads(opt, params):
    """The rank-averaged gradient the optimizer is about to apply, reassembled from its shards (all-gather) --
    what torch.optim.AdamW must be fed to be compared with it. ``None`` for params without a gradient."""
    engine = opt.engine
    engine.reduce()
    out = {}
    for bucket in engine.buckets:
        if engine.sharded(bucket):
            full = torch.empty(bucket.layout.padded, dtype=bucket.shard_grad.dtype)
            if dist.is_initialized():
                dist.all_gather_into_tensor(full, bucket.shard_grad.contiguous())
            else:
                full.copy_(bucket.shard_grad)
            for i, p in enumerate(bucket.params):
                s = bucket.layout.slots[i]
                out[p] = full[s.offset : s.offset + s.numel].view_as(p).clone()
        else:
            for p in bucket.params:
                out[p] = None if p.grad is None else p.grad.clone()
    present = torch.tensor([float(f) for b in engine.buckets for f in b.present])
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(present)
    flags = iter((present > 0).tolist())
    for b in engine.buckets:
        for p in b.params:
            if not next(flags):
                out[p] = None
    return [out.get(p) for p in params]


def build(cfg):
    if cfg["model"] == "mlp":
        torch.manual_seed(0)
        model = MLP()
        batch = mlp_batch
    else:
        model = tiny_llama()
        batch = llama_batch
    return model, batch


def train_vs_reference(rank, world_size, cfg):
    """Train with ShardedAdamW on this rank's micro-batches. In lockstep, feed torch.optim.AdamW (on its own copy
    of the params) the rank-averaged gradient of *all* ranks' micro-batches, computed at the same weights the
    ranks used (a probe model), so the two optimizers see the same gradients up to reduction-order rounding and
    their trajectories cannot drift apart chaotically. Return the worst relative errors seen."""
    model, batch = build(cfg)
    probe = clone_model(model)
    ref_model = clone_model(model)
    opt = ShardedAdamW(
        param_groups(model),
        stage=cfg["stage"],
        bucket_size=cfg.get("bucket_size", 64),
        max_grad_norm=cfg.get("max_grad_norm"),
        impl=cfg.get("impl", "auto"),
    )
    ref = torch.optim.AdamW(param_groups(ref_model), foreach=False)
    ref_params = list(ref_model.parameters())
    accum, use_no_sync = cfg.get("accum", 1), cfg.get("no_sync", True)
    worst = {"param": 0.0, "state": 0.0, "grad_norm": 0.0}
    for step in range(cfg["steps"]):
        probe.load_state_dict(model.state_dict())
        for micro in range(accum):
            with no_sync_if(opt, use_no_sync and micro < accum - 1):
                (loss_fn(model, batch(step, rank, micro)) / accum).backward()
        applied = averaged_grads(opt, list(model.parameters()))
        opt.step()
        opt.zero_grad()
        if step == 0:
            opt.engine.peak_full_bytes = 0  # measure the steady state, after the bucket order is settled
        # the reduction itself: the averaged gradient equals the probe's average of every rank's local gradient
        reference_grads(probe, [[batch(step, r, m) for m in range(accum)] for r in range(world_size)], world_size)
        for g, p in zip(applied, probe.parameters()):
            assert (g is None) == (p.grad is None), "a gradient is present in one of them only"
            if g is not None:
                worst["reduce"] = max(worst.get("reduce", 0.0), rel_err(g, p.grad))
            p.grad = None
        for q, g in zip(ref_params, applied):
            q.grad = g
        grads = [g for g in applied if g is not None]
        ref_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item()
        if cfg.get("max_grad_norm"):
            torch.nn.utils.clip_grad_norm_(ref_params, cfg["max_grad_norm"])
        ref.step()
        ref.zero_grad()
        worst["grad_norm"] = max(worst["grad_norm"], abs(opt.grad_norm - ref_norm) / ref_norm)
        for p, q in zip(model.parameters(), ref_params):
            worst["param"] = max(worst["param"], rel_err(p, q))
        assert_ranks_identical(list(model.parameters()))
        if step % 10 == 9 or step == cfg["steps"] - 1:
            worst["state"] = max(worst["state"], max_state_err(opt.state_dict(), ref.state_dict()))
    # the never-used param is untouched and has no state, exactly as in torch
    if isinstance(model, MLP):
        assert torch.equal(model.unused, ref_model.unused)
    worst["state_bytes"] = opt.state_bytes()
    worst["owned"] = sum(b.layout.shard for b in opt.engine.buckets)
    worst["trainable"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    worst["bucket_padded"] = [b.layout.padded for b in opt.engine.buckets]
    worst["padding"] = [b.layout.padding for b in opt.engine.buckets]
    worst["peak_full_bytes"] = opt.engine.peak_full_bytes
    worst["grad_bytes"] = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return worst


def nan_skip(rank, world_size, stage):
    """A NaN gradient on one rank skips the step on every rank; weights and state stay untouched."""
    torch.manual_seed(0)
    model = MLP()
    opt = ShardedAdamW(model.parameters(), lr=1e-2, stage=stage, bucket_size=64)
    for step in range(3):
        model.loss(mlp_batch(step, rank)).backward()
        opt.step()
        opt.zero_grad()
    before = [p.detach().clone() for p in model.parameters()]
    sd_before = opt.state_dict()
    loss = model.loss(mlp_batch(3, rank))
    if rank == world_size - 1:
        loss = loss * float("nan")
    loss.backward()
    opt.step()
    opt.zero_grad()
    assert opt.last_step_skipped and opt.skipped_steps == 1 and math.isnan(opt.grad_norm)
    for p, q in zip(model.parameters(), before):
        assert torch.equal(p, q), "a skipped step changed a weight"
    sd_after = opt.state_dict()
    for k, st in sd_before["state"].items():
        for name, t in st.items():
            assert torch.equal(t, sd_after["state"][k][name]), f"a skipped step changed {name} of param {k}"
    # and training continues normally afterwards
    model.loss(mlp_batch(4, rank)).backward()
    opt.step()
    assert not opt.last_step_skipped
    assert_ranks_identical(list(model.parameters()))
    return True


def matrix(rank, world_size, configs):
    return [train_vs_reference(rank, world_size, cfg) for cfg in configs]


def ddp_stage1(rank, world_size):
    """Model wrapped in DDP (which averages gradients in backward) + stage 1 with grads_reduced=True: no
    reduce-scatter at all, only the param all-gather; matches torch AdamW fed DDP's gradients."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.manual_seed(0)
    model = MLP()
    model.unused.requires_grad_(False)  # DDP without find_unused_parameters needs every trainable param used
    ddp = DDP(model)
    ref_model = clone_model(model)
    opt = ShardedAdamW(param_groups(model), stage=1, grads_reduced=True, bucket_size=64)
    ref = torch.optim.AdamW(param_groups(ref_model), foreach=False)
    ref_params = list(ref_model.parameters())
    worst = 0.0
    for step in range(20):
        x, y = mlp_batch(step, rank)
        torch.nn.functional.mse_loss(ddp(x), y).backward()
        for q, p in zip(ref_params, model.parameters()):
            q.grad = None if p.grad is None else p.grad.clone()
        opt.step()
        opt.zero_grad()
        ref.step()
        ref.zero_grad()
        worst = max(worst, max(rel_err(p, q) for p, q in zip(model.parameters(), ref_params)))
        assert_ranks_identical(list(model.parameters()))
    counters = opt.comm_counters()
    assert "reduce_scatter" not in counters and "all_reduce" not in counters, counters
    assert counters["all_gather"]["calls"] > 0
    return worst


def ddp_stage2_is_refused(rank, world_size):
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.manual_seed(0)
    model = MLP()
    model.unused.requires_grad_(False)
    ddp = DDP(model)
    opt = ShardedAdamW(model.parameters(), stage=2, bucket_size=64)
    before = [p.detach().clone() for p in model.parameters()]
    x, y = mlp_batch(0, rank)
    torch.nn.functional.mse_loss(ddp(x), y).backward()
    try:
        opt.step()
    except ValueError as e:
        assert "DistributedDataParallel" in str(e)
    else:
        raise AssertionError("stage 2 under DDP was not detected")
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    return True


def comm_bytes(rank, world_size, stage):
    """Bytes per step: reduce-scatter + all-gather == DDP's all-reduce of the same gradients (both measured:
    DDP's through a comm hook that counts what its buckets all-reduce), plus a control message of a few bytes."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = tiny_llama()
    ddp_model = DDP(clone_model(model))
    ddp_bytes = [0]

    def counting_hook(state, bucket):
        buf = bucket.buffer()
        n = world_size
        ddp_bytes[0] += 2 * (n - 1) / n * buf.numel() * buf.element_size()
        fut = dist.all_reduce(buf.div_(n), async_op=True).get_future()
        return fut.then(lambda f: f.value()[0])

    ddp_model.register_comm_hook(None, counting_hook)
    opt = ShardedAdamW(model.parameters(), stage=stage, bucket_size=4096)
    ids = llama_batch(0, rank)
    for step in range(2):  # the first step also broadcasts the bucket order once; count the second
        opt.reset_comm_counters()
        ddp_bytes[0] = 0
        llama_loss(model, ids).backward()
        opt.step()
        opt.zero_grad()
        llama_loss(ddp_model, ids).backward()
    c = opt.comm_counters()
    padded_bytes = sum(b.layout.padded * 4 for b in opt.engine.buckets)
    n = world_size
    expect = (n - 1) / n * padded_bytes
    assert abs(c["reduce_scatter"]["bytes"] - expect) <= len(opt.engine.buckets), c
    assert abs(c["all_gather"]["bytes"] - expect) <= len(opt.engine.buckets), c
    grad_bytes = sum(p.numel() * 4 for p in model.parameters() if p.requires_grad)
    return {
        "rs": c["reduce_scatter"]["bytes"],
        "ag": c["all_gather"]["bytes"],
        "control": c.get("control", {}).get("bytes", 0),
        "ddp": ddp_bytes[0],
        "grad_bytes": grad_bytes,
        "padded_bytes": padded_bytes,
    }


def bf16_master(rank, world_size, stage):
    """bf16 params + fp32 master shards over N ranks (gradients reduced in fp32): the master follows torch AdamW
    on fp32 copies fed the averaged (upcast) bf16 gradients, and every rank's bf16 params are identical."""
    torch.manual_seed(0)
    model = MLP().to(torch.bfloat16)
    trainable = [p for p in model.parameters() if p.requires_grad]
    masters = [p.detach().float().clone().requires_grad_() for p in trainable]
    opt = ShardedAdamW(model.parameters(), lr=1e-2, stage=stage, bucket_size=64, reduce_dtype=torch.float32)
    ref = torch.optim.AdamW(masters, lr=1e-2, foreach=False)
    worst = 0.0
    for step in range(30):
        model.loss(mlp_batch(step, rank, dtype=torch.bfloat16)).backward()
        applied = averaged_grads(opt, trainable)
        for q, g in zip(masters, applied):
            q.grad = g
        opt.step()
        opt.zero_grad()
        ref.step()
        sd = opt.state_dict()
        index = {p: k for k, p in enumerate(model.parameters())}
        for p, q in zip(trainable, masters):
            if index[p] in sd["state"]:
                worst = max(worst, rel_err(sd["state"][index[p]]["master"], q))
        assert_ranks_identical(trainable)
        for p, q in zip(trainable, masters):
            assert torch.equal(p, sd["state"][index[p]]["master"].to(torch.bfloat16)) if index[p] in sd["state"] else True
    assert opt.state_bytes() == sum(b.layout.shard for b in opt.engine.buckets) * 3 * 4
    return worst


def grad_scaler_overflow_on_one_rank(rank, world_size, stage):
    """fp16 + GradScaler: an overflow on the last rank only must skip the step on every rank and back off every
    rank's scale (else the ranks' scales, and then their weights, drift apart)."""
    torch.manual_seed(0)
    model = MLP().to(torch.float16)
    opt = ShardedAdamW(model.parameters(), lr=1e-3, stage=stage, bucket_size=64)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    scales, skipped = [], []
    for step in range(6):
        x, y = mlp_batch(step, rank, dtype=torch.float16)
        if step == 3 and rank == world_size - 1:
            x = x * 6e4  # overflows fp16 in backward on this rank only
        scaler.scale(model.loss((x, y))).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        scales.append(scaler.get_scale())
        skipped.append(opt.last_step_skipped)
        assert_ranks_identical([p for p in model.parameters()])
    assert skipped[3] and not any(skipped[:3])
    return scales


def load_consolidated(rank, world_size, path, steps):
    """Load a consolidated state dict saved at another world size, continue training: matches torch.optim.AdamW
    that loaded the same dict and is fed the same averaged gradients."""
    torch.manual_seed(0)
    model = MLP()
    saved = torch.load(path, weights_only=True)
    model.load_state_dict(saved["model"])
    ref_model = clone_model(model)
    opt = ShardedAdamW(param_groups(model), stage=2, bucket_size=48)
    opt.load_state_dict(saved["optim"])
    ref = torch.optim.AdamW(param_groups(ref_model), foreach=False)
    ref.load_state_dict(saved["optim"])
    assert max_state_err(opt.state_dict(), ref.state_dict()) == 0.0  # the reshard itself is exact
    worst = 0.0
    ref_params = list(ref_model.parameters())
    for step in range(steps, steps + 10):
        model.loss(mlp_batch(step, rank)).backward()
        applied = averaged_grads(opt, list(model.parameters()))
        opt.step()
        opt.zero_grad()
        for q, g in zip(ref_params, applied):
            q.grad = g
        ref.step()
        ref.zero_grad()
        worst = max(worst, max(rel_err(p, q) for p, q in zip(model.parameters(), ref_params)))
    return worst, max_state_err(opt.state_dict(), ref.state_dict())


def save_consolidated(rank, world_size, path, steps):
    torch.manual_seed(0)
    model = MLP()
    opt = ShardedAdamW(param_groups(model), stage=2, bucket_size=64)
    for step in range(steps):
        model.loss(mlp_batch(step, rank)).backward()
        opt.step()
        opt.zero_grad()
    sd = opt.state_dict()  # collective: every rank gets the full, identical state
    if rank == 0:
        torch.save({"model": model.state_dict(), "optim": sd}, path)
    return True


def layout_mismatch(rank, world_size):
    sizes = [4, 5] if rank == 0 else [4, 6]
    params = [torch.nn.Parameter(torch.randn(n)) for n in sizes]
    try:
        ShardedAdamW(params)
    except ValueError as e:
        assert "different parameter layouts" in str(e)
        return True
    raise AssertionError("mismatch not detected")


def rank_dependent_graph(rank, world_size, stage):
    """A branch only rank 0 runs (its params get a gradient on rank 0 only) and a param no rank uses: no hang,
    the branch's update uses (g_0 + 0 + ...)/N as DDP would, and the unused param keeps no state."""
    torch.manual_seed(0)
    model = MLP()
    branch = torch.nn.Linear(7, 7)
    params = list(model.parameters()) + list(branch.parameters())
    opt = ShardedAdamW(params, lr=1e-2, stage=stage, bucket_size=40)
    ref_params = [p.detach().clone().requires_grad_() for p in params]
    ref = torch.optim.AdamW(ref_params, lr=1e-2, foreach=False)
    for step in range(8):
        out = model(mlp_batch(step, rank)[0])
        if rank == 0:
            out = branch(out)
        out.pow(2).mean().backward()
        applied = averaged_grads(opt, params)
        opt.step()
        opt.zero_grad()
        for q, g in zip(ref_params, applied):
            q.grad = g
        ref.step()
        ref.zero_grad()
        assert_ranks_identical(params)
    for p, q in zip(params, ref_params):
        assert rel_err(p, q) <= 1e-6
    assert torch.equal(model.unused, ref_params[[i for i, p in enumerate(params) if p is model.unused][0]])
    return True


def free_running(rank, world_size, model_name, steps, batches_per_rank):
    """N ranks on N micro-batches vs (run separately) one process on their concatenation: return the params."""
    cfg = {"model": model_name}
    model, batch = build(cfg)
    opt = ShardedAdamW(param_groups(model, lr=1e-3), stage=2, bucket_size=256)
    per_rank = batches_per_rank // world_size
    for step in range(steps):
        loss = 0.0
        for micro in range(per_rank):
            r = rank * per_rank + micro
            with no_sync_if(opt, micro < per_rank - 1):
                (loss_fn(model, batch(step, r)) / per_rank).backward()
        opt.step()
        opt.zero_grad()
    return [p.detach().clone() for p in model.parameters()]


def expect_error(fn, exc_type, match):
    try:
        fn()
    except exc_type as e:
        assert match in str(e), str(e)
        return str(e)
    raise AssertionError(f"expected {exc_type.__name__} matching {match!r}")


def reentrant_double_landing(rank, world_size):
    """A trainable param used inside a reentrant checkpoint and outside it gets its gradient twice in one backward,
    after its bucket was reduced: every rank raises the same clear error (no hang, no silent loss)."""
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    lin = torch.nn.Linear(8, 8)
    other = torch.nn.Linear(8, 8)
    opt = ShardedAdamW(list(lin.parameters()) + list(other.parameters()), stage=2, bucket_size=10**6)
    x = torch.randn(4, 8, requires_grad=True)
    h = checkpoint(lambda t: lin(t), x, use_reentrant=True)
    (other(h) + lin(h)).sum().backward()
    msg = expect_error(opt.step, RuntimeError, "use_reentrant=False")
    # the optimizer is usable afterwards
    (other(lin(x))).sum().backward()
    opt.step()
    assert_ranks_identical(list(lin.parameters()) + list(other.parameters()))
    return msg


def bad_grad_on_one_rank(rank, world_size, stage):
    torch.manual_seed(0)
    model = MLP()
    opt = ShardedAdamW(model.parameters(), stage=stage, bucket_size=64)
    before = [p.detach().clone() for p in model.parameters()]
    # stage 2 consumes gradients in backward; under no_sync they stay in param.grad until step() packs them
    with opt.no_sync():
        model.loss(mlp_batch(0, rank)).backward()
    if rank == 1:
        model.fc1.weight.grad.data = torch.zeros(3)  # .data bypasses torch's own check
    msg = expect_error(opt.step, ValueError, "shape")
    assert "rank 1" in msg
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    return True


def hidden_grad_scaler_refused(rank, world_size):
    torch.manual_seed(0)
    model = MLP().to(torch.float16)
    opt = ShardedAdamW(model.parameters(), stage=2, bucket_size=64)
    inner = opt.step
    opt.step = lambda *a, **k: inner(*a, **k)
    scaler = torch.amp.GradScaler("cpu")
    scaler.scale(model.loss(mlp_batch(0, rank, dtype=torch.float16))).backward()
    expect_error(lambda: scaler.step(opt), RuntimeError, "without passing itself")
    return True


def sometimes_unused_param(rank, world_size):
    """A param in the first bucket to fill is unused every other step: its bucket can't launch until the end of
    those backwards, holding every bucket behind it. After the first such step it moves to the end of the order."""
    torch.manual_seed(0)
    model = tiny_llama()
    gate = torch.nn.Parameter(torch.ones(()))
    params = [p for p in model.parameters() if p.requires_grad] + [gate]  # reversed: gate in the first bucket
    opt = ShardedAdamW(params, stage=2, bucket_size=2500)
    peaks = []
    for step in range(6):
        opt.engine.reset_peak()
        loss = llama_loss(model, llama_batch(step, rank))
        if step % 2 == 0:
            loss = loss * gate
        loss.backward()
        opt.step()
        opt.zero_grad()
        peaks.append(opt.engine.peak_full_bytes)
        assert_ranks_identical(params)
    grad_bytes = sum(p.numel() * 4 for p in params)
    return peaks, grad_bytes


def backward_fails_midway(rank, world_size):
    """A backward that raises halfway (an OOM, say) on every rank, then zero_grad(): the next steps are exact."""
    torch.manual_seed(0)
    model = MLP()
    ref_model = clone_model(model)
    opt = ShardedAdamW(model.parameters(), stage=2, bucket_size=64)
    ref = torch.optim.AdamW(ref_model.parameters(), foreach=False)

    class Boom(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, g):
            raise MemoryError("simulated OOM")

    out = model(mlp_batch(0, rank)[0])
    loss = (Boom.apply(out[:, :2]).sum() + out.pow(2).sum())
    try:
        loss.backward()
    except MemoryError:
        pass
    opt.zero_grad()
    worst = 0.0
    for step in range(1, 5):
        model.loss(mlp_batch(step, rank)).backward()
        applied = averaged_grads(opt, list(model.parameters()))
        opt.step()
        opt.zero_grad()
        for q, g in zip(ref_model.parameters(), applied):
            q.grad = g
        ref.step()
        ref.zero_grad()
        worst = max(worst, max(rel_err(p, q) for p, q in zip(model.parameters(), ref_model.parameters())))
    return worst


def group_count_mismatch(rank, world_size):
    a, b = torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(4))
    groups = [{"params": [a, b]}] if rank == 0 else [{"params": [a]}, {"params": [b]}]
    expect_error(lambda: ShardedAdamW(groups), ValueError, "different parameter layouts")
    return True
