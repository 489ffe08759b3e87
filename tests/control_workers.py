"""Per-rank bodies of the control-plane tests: host reads per phase, reentrant checkpointing with fused step in
backward, the fill order agreed over the world group."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.checkpoint import checkpoint

from host_reads import reads_per_step
from workers import assert_ranks_identical
from zeroadamw import ShardedAdamW, SparseAdamW


class Stack(nn.Module):
    """``layers`` Linear layers (2 params each) -- with bucket_size = one layer's params, one bucket per layer."""

    def __init__(self, layers=8, d=24, reentrant=False, experts=False):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(d, d) for _ in range(layers))
        self.head = nn.Linear(d, 3)
        self.reentrant = reentrant
        self.experts = nn.Parameter(torch.randn(4, d, d) * 0.1) if experts else None

    def forward(self, x):
        if self.experts is not None:
            route = (x.sum(1) > 0).long() % 4
            x = x + torch.einsum("bij,bj->bi", self.experts[route], x)
        for i, layer in enumerate(self.layers):
            if self.reentrant and i > 0:  # every layer but the first in a reentrant segment
                x = checkpoint(lambda t, m=layer: torch.tanh(m(t)), x, use_reentrant=True)
            else:
                x = torch.tanh(layer(x))
        if self.reentrant:  # the head too: the first gradients of backward arrive inside a nested backward
            return checkpoint(self.head, x, use_reentrant=True)
        return self.head(x)


def batch(step, rank, d=24):
    g = torch.Generator().manual_seed(100 * step + rank)
    x = torch.randn(6, d, generator=g, requires_grad=True)  # requires_grad: reentrant checkpoint needs an input
    return x, torch.randn(6, 3, generator=g)                #  that requires grad to build its backward


def loss_of(model, b):
    x, y = b
    return nn.functional.mse_loss(model(x), y)


def host_reads(rank, world, cfg):
    """Counts host reads in backward and in step() at steady state (after 2 warm-up steps; the first step learns
    the bucket order and agrees the layout)."""
    torch.manual_seed(0)
    model = Stack(layers=cfg["layers"], experts=cfg.get("sparse", False))
    per_layer = 24 * 24 + 24
    kw = dict(lr=1e-2, bucket_size=per_layer * cfg.get("layers_per_bucket", 1),
              step_in_backward=cfg.get("sib", False), max_grad_norm=cfg.get("clip"))
    if cfg.get("sparse"):
        experts = [model.experts]
        dense = [p for n, p in model.named_parameters() if n != "experts"]
        opt = SparseAdamW([{"params": dense}, {"params": experts, "sparse": "rows"}], **kw)
    else:
        opt = ShardedAdamW(model.parameters(), **kw)
    out = reads_per_step(lambda step: loss_of(model, batch(step, rank)), opt, cfg.get("steps", 5))
    return {"buckets": len(opt.engine.buckets), **out}


def reentrant(rank, world, cfg):
    """Fused step in backward with reentrant activation checkpointing == the same model without checkpointing
    trained by stage 2 (no step in backward): every param trains, ranks identical."""
    torch.manual_seed(0)
    a = Stack(layers=6, reentrant=True)
    b = Stack(layers=6, reentrant=False)
    b.load_state_dict(a.state_dict())
    bs = (24 * 24 + 24) * cfg.get("layers_per_bucket", 1)
    oa = ShardedAdamW(a.parameters(), lr=1e-2, bucket_size=bs, step_in_backward=True, max_grad_norm=cfg.get("clip"))
    ob = ShardedAdamW(b.parameters(), lr=1e-2, bucket_size=bs, max_grad_norm=cfg.get("clip"))
    start = [p.detach().clone() for p in a.parameters()]
    for step in range(cfg.get("steps", 6)):
        for m, o in ((a, oa), (b, ob)):
            loss_of(m, batch(step, rank)).backward()
            o.step()
            o.zero_grad()
    worst = max((pa - pb).abs().max().item() for pa, pb in zip(a.parameters(), b.parameters()))
    moved = [bool((p.detach() - s).abs().max() > 0) for p, s in zip(a.parameters(), start)]
    assert_ranks_identical(list(a.parameters()))
    return {"worst": worst, "moved": moved}


class TwoBranch(nn.Module):
    """Rank-dependent forward order of two equally shaped layers (so the order buckets fill in differs between
    ranks), plus an expert tensor in a per-rank expert group."""

    def __init__(self, d=16):
        super().__init__()
        self.experts = nn.Parameter(torch.randn(2, d, d) * 0.1)
        self.a = nn.Linear(d, d, bias=False)
        self.b = nn.Linear(d, d, bias=False)

    def forward(self, x, rank):
        x = x + x @ self.experts[0]
        first, second = (self.a, self.b) if rank == 0 else (self.b, self.a)
        return second(torch.tanh(first(x)))


def fill_order_over_world(rank, world, cfg):
    """Expert groups of one rank each, listed first (so the first hooked bucket is an expert-group bucket): the
    launch order learnt at the first backward must be rank 0's on every rank, or the world buckets' reduce-scatters
    pair a's gradient with b's. Checks the orders and the params against AdamW on averaged gradients."""
    torch.manual_seed(0)
    model = TwoBranch()
    groups = [dist.new_group([r]) for r in range(world)]  # every rank creates every group, in the same order
    ref = TwoBranch()
    ref.load_state_dict(model.state_dict())
    opt = SparseAdamW([{"params": [model.experts], "sparse": "rows", "process_group": groups[rank]},
                       {"params": [model.a.weight, model.b.weight]}], lr=1e-2, weight_decay=0.0, bucket_size=16 * 16)
    ropt = torch.optim.AdamW([ref.a.weight, ref.b.weight], lr=1e-2, weight_decay=0.0)
    # each rank's experts are its own (an expert group of one): plain AdamW on the local gradient (row 1 is never
    # used: zero gradient, zero moments -- it stays put in both)
    eopt = torch.optim.AdamW([ref.experts], lr=1e-2, weight_decay=0.0)
    for step in range(cfg.get("steps", 4)):
        x = torch.randn(4, 16, generator=torch.Generator().manual_seed(step * 10 + rank))
        model(x, rank).square().mean().backward()
        opt.step()
        opt.zero_grad()
        ref(x, rank).square().mean().backward()
        for p in (ref.a.weight, ref.b.weight):
            dist.all_reduce(p.grad)
            p.grad /= world
        ropt.step()
        ropt.zero_grad()
        eopt.step()
        eopt.zero_grad()
    order = [opt.engine.buckets.index(b) for b in opt.engine.hooked_buckets]
    orders = [None] * world
    dist.all_gather_object(orders, order)
    worst = max((p - q).abs().max().item() for p, q in zip(model.parameters(), ref.parameters()))
    return {"orders": orders, "worst": worst}


def grad_scaler_attribute_protocol(rank, world, cfg):
    """GradScaler's attribute protocol (``grad_scale`` / ``found_inf`` set on the optimizer, ``step()`` called
    without the scaler -- what torch does when step() has no ``grad_scaler`` argument) at N ranks, stage 2, fp16:
    with ``attach_grad_scaler`` it equals the keyword protocol step for step (scales, skips, params); without it,
    a clear error on every rank."""
    import functools

    torch.manual_seed(0)
    a, b = Stack(layers=3).half(), Stack(layers=3).half()
    b.load_state_dict(a.state_dict())
    oa = ShardedAdamW(a.parameters(), lr=1e-3, stage=cfg.get("stage", 2))
    ob = ShardedAdamW(b.parameters(), lr=1e-3, stage=cfg.get("stage", 2))
    inner = ob.step

    def hidden(closure=None):  # no grad_scaler in the signature: torch uses the attribute protocol
        return inner(closure)

    ob.step = hidden
    sa = torch.amp.GradScaler("cpu", init_scale=2.0**22, growth_interval=2)
    sb = torch.amp.GradScaler("cpu", init_scale=2.0**22, growth_interval=2)
    if cfg.get("attach", True):
        ob.attach_grad_scaler(sb)
    skipped = 0
    for step in range(8):
        x, y = batch(step, rank)
        for m, o, s in ((a, oa, sa), (b, ob, sb)):
            s.scale(nn.functional.mse_loss(m(x.half()), y.half())).backward()
            s.step(o)
            s.update()
            o.zero_grad()
        assert sa.get_scale() == sb.get_scale(), (step, sa.get_scale(), sb.get_scale())
        assert oa.last_step_skipped == ob.last_step_skipped
        skipped += oa.last_step_skipped
    worst = max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters()))
    assert_ranks_identical(list(b.parameters()))
    return {"worst": worst, "skipped": skipped, "scale": sb.get_scale()}


def backend_spelling(rank, world, cfg):
    """The process group initialised as a user script would: ``init_process_group()`` without a backend (reports
    "undefined"), ``"gloo"`` or ``"cpu:gloo"`` -- stage 2, fused step in backward and SparseAdamW with an expert
    subgroup train like torch.optim.AdamW on rank-averaged gradients."""
    import os

    backend = cfg["backend"]
    kw = dict(init_method=f"tcp://127.0.0.1:{os.environ['MASTER_PORT']}", rank=rank, world_size=world)
    dist.init_process_group(backend, **kw) if backend else dist.init_process_group(**kw)
    out = {"backend": str(dist.get_backend()), "worst": {}}
    for mode in ("stage2", "sib", "sparse"):
        torch.manual_seed(0)
        model, ref = Stack(layers=3, experts=mode == "sparse"), Stack(layers=3, experts=mode == "sparse")
        ref.load_state_dict(model.state_dict())
        if mode == "sparse":
            egroup = dist.new_group(list(range(world)))  # an expert group spanning the ranks (same experts)
            dense = [p for n, p in model.named_parameters() if n != "experts"]
            opt = SparseAdamW([{"params": dense}, {"params": [model.experts], "sparse": "rows",
                                                   "process_group": egroup}], lr=1e-2, weight_decay=0.0,
                              bucket_size=600)
        else:
            opt = ShardedAdamW(model.parameters(), lr=1e-2, weight_decay=0.0, bucket_size=600,
                               step_in_backward=mode == "sib")
        ropt = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.0)
        for step in range(4):
            loss_of(model, batch(step, rank)).backward()
            opt.step()
            opt.zero_grad()
            loss_of(ref, batch(step, rank)).backward()
            for p in ref.parameters():
                dist.all_reduce(p.grad)
                p.grad /= world
            ropt.step()
            ropt.zero_grad()
        if mode == "sparse":  # lazy rows: untouched expert rows keep their weights; compare the touched ones only
            pairs = [(p, q) for (n, p), q in zip(model.named_parameters(), ref.parameters()) if n != "experts"]
        else:
            pairs = list(zip(model.parameters(), ref.parameters()))
        out["worst"][mode] = max((p - q).abs().max().item() for p, q in pairs)
        assert_ranks_identical(list(model.parameters()))
    return out
