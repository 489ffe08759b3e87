"""Per-rank bodies of the step-in-backward tests (spawned gloo processes)."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from helpers import MLP, clone_model, llama_batch, llama_loss, mlp_batch, no_sync_if, param_groups, rel_err, tiny_llama
from reference_rules import ReferenceAdaLomo
from workers import assert_ranks_identical, averaged_grads
from zeroadamw import ShardedAdamW


class MoEish(torch.nn.Module):
    """MLP plus a fused 3-D "experts" weight [E, out, in] (as in HF Mixtral/Qwen-MoE), a 1-D param and a bias."""

    def __init__(self):
        super().__init__()
        self.mlp = MLP()
        self.experts = torch.nn.Parameter(torch.randn(3, 7, 7) * 0.2)
        self.scale = torch.nn.Parameter(torch.ones(7))

    def loss(self, batch):
        x, y = batch
        h = self.mlp(x)
        h = torch.einsum("eoi,bi->bo", self.experts, h) * self.scale + h
        return torch.nn.functional.mse_loss(h, y)


def build(name):
    torch.manual_seed(0)
    if name == "llama":
        return tiny_llama(), llama_batch, lambda m, b: llama_loss(m, b)
    return MoEish(), mlp_batch, lambda m, b: m.loss(b)


def schedule(step, warm=5, total=40):
    return (step + 1) / warm if step < warm else 0.5 * (1 + math.cos(math.pi * (step - warm) / (total - warm)))


def sib_vs_plain(rank, world, cfg):
    """step_in_backward=True vs False, same rule: the same params every step, ranks identical every step."""
    model, batch, loss_fn = build(cfg["model"])
    twin = clone_model(model)
    kw = dict(rule=cfg["rule"], max_grad_norm=cfg.get("clip"), bucket_size=cfg.get("bucket_size", 500),
              lr=cfg.get("lr", 1e-2))
    a = ShardedAdamW(param_groups(model, lr=kw["lr"]), **{k: v for k, v in kw.items() if k != "lr"})
    b = ShardedAdamW(param_groups(twin, lr=kw["lr"]), step_in_backward=True, **{k: v for k, v in kw.items() if k != "lr"})
    sa = torch.optim.lr_scheduler.LambdaLR(a, schedule)
    sb = torch.optim.lr_scheduler.LambdaLR(b, schedule)
    accum = cfg.get("accum", 1)
    worst = 0.0
    peaks = []
    for step in range(cfg["steps"]):
        b.engine.reset_peak()
        for m, o, sch in ((model, a, sa), (twin, b, sb)):
            for k in range(accum):
                with no_sync_if(o, k < accum - 1):
                    (loss_fn(m, batch(step, rank, k)) / accum).backward()
            o.step()
            o.zero_grad()
            sch.step()
        peaks.append(b.engine.peak_grad_bytes)
        worst = max(worst, max(rel_err(p, q) for p, q in zip(twin.parameters(), model.parameters())))
        assert_ranks_identical(list(twin.parameters()))
        assert all(p.grad is None for p in twin.parameters())
    sd_a, sd_b = a.state_dict(), b.state_dict()
    state = max(rel_err(sd_b["state"][k][n], sd_a["state"][k][n]) for k in sd_a["state"] for n in sd_a["state"][k])
    grad_bytes = sum(p.numel() * 4 for p in twin.parameters() if p.requires_grad)
    biggest = max(bk.layout.padded * 4 for bk in b.engine.buckets)
    return {"param": worst, "state": state, "peak_grad_bytes": max(peaks[1:]), "grad_bytes": grad_bytes,
            "biggest_bucket_bytes": biggest,
            "grad_norm": (a.grad_norm, b.grad_norm)}


def adalomo_vs_reference(rank, world, steps):
    """rule="adalomo" (sharded at N ranks) == the whole-tensor reference fed the same averaged gradients."""
    model, batch, loss_fn = build("moe")
    ref_model = clone_model(model)
    params = [p for p in model.parameters() if p.requires_grad]
    ref_params = [p for p in ref_model.parameters() if p.requires_grad]
    opt = ShardedAdamW(params, lr=1e-2, weight_decay=0.1, rule="adalomo", bucket_size=100)
    ref = ReferenceAdaLomo(ref_params, lr=1e-2, weight_decay=0.1)
    worst = 0.0
    for step in range(steps):
        loss_fn(model, batch(step, rank)).backward()
        applied = averaged_grads(opt, params)
        opt.step()
        opt.zero_grad()
        ref.step({q: g for q, g in zip(ref_params, applied) if g is not None})
        worst = max(worst, max(rel_err(p, q) for p, q in zip(params, ref_params)))
        assert_ranks_identical(params)
    return worst


def sib_under_ddp(rank, world):
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.manual_seed(0)
    model = MLP()
    model.unused.requires_grad_(False)
    ddp = DDP(model)
    opt = ShardedAdamW(model.parameters(), step_in_backward=True, bucket_size=64)
    x, y = mlp_batch(0, rank)
    torch.nn.functional.mse_loss(ddp(x), y).backward()
    try:
        opt.step()
    except ValueError as e:
        assert "DistributedDataParallel" in str(e)
        return True
    raise AssertionError("step_in_backward under DDP was not detected")
