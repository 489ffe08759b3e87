"""Per-rank bodies of the multi-process tests (run by tests/distributed.py in spawned gloo processes)."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from helpers import (
    MLP,
    clone_model,
    llama_batch,
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
            dist.all_gather_into_tensor(full, bucket.shard_grad.contiguous())
            for i, p in enumerate(bucket.params):
                s = bucket.layout.slots[i]
                out[p] = full[s.offset : s.offset + s.numel].view_as(p).clone()
        else:
            for p in bucket.params:
                out[p] = None if p.grad is None else p.grad.clone()
    present = torch.tensor([float(f) for b in engine.buckets for f in b.present])
    if dist.get_world_size() > 1:
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
