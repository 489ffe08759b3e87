"""Per-rank body of the diagnostics tests: zeroadamw.diagnostics next to the same quantities computed the
unsharded way (full params on this rank, the rank-averaged gradient recomputed from every rank's batch)."""

from __future__ import annotations

import math

import torch

from helpers import MLP, clone_model, mlp_batch, param_groups, reference_grads
from zeroadamw import ShardedAdamW, SparseAdamW
from zeroadamw.diagnostics import Diagnostics

MAX_NORM = 0.5


def _norm(ts):
    return math.sqrt(sum(t.detach().double().square().sum().item() for t in ts))


def diag_vs_unsharded(rank, world_size, cfg, steps=5):
    torch.manual_seed(0)
    model = MLP()
    groups = param_groups(model)
    groups[0]["name"], groups[1]["name"] = "decay", "no_decay"
    kind = cfg["opt"]
    if kind == "sparse":  # fc1.weight as a row-sharded group (every row touched: dense gradients)
        groups[0]["params"] = [p for p in groups[0]["params"] if p is not model.fc1.weight]
        groups.insert(0, {"params": [model.fc1.weight], "sparse": "rows", "name": "rows", "lr": 2e-2})
        opt = SparseAdamW(groups, stage=2, bucket_size=cfg.get("bucket_size", 150), max_grad_norm=MAX_NORM)
    elif kind == "torch":
        opt = torch.optim.AdamW(groups, lr=1e-2)
    else:
        opt = ShardedAdamW(groups, stage=cfg["stage"], bucket_size=cfg.get("bucket_size", 150),
                           max_grad_norm=MAX_NORM, decay=cfg.get("decay", "decoupled"))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    ref = clone_model(model)
    diag = Diagnostics(opt)
    diag.snapshot()
    out = []
    for step in range(steps):
        prev = [[p.detach().clone() for p in g["params"] if p.requires_grad] for g in opt.param_groups]
        used = [(g["lr"], g["weight_decay"]) for g in opt.param_groups]
        # the unsharded reference gradient: every rank's batch, averaged
        with torch.no_grad():
            for a, b in zip(ref.parameters(), model.parameters()):
                a.copy_(b)
        reference_grads(ref, [[mlp_batch(step, r)] for r in range(world_size)], world_size)
        by_param = {id(b): a.grad for a, b in zip(ref.parameters(), model.parameters())}
        ref_group_grad = [_norm([by_param[id(p)] for p in g["params"] if by_param.get(id(p)) is not None])
                          for g in opt.param_groups]
        total = math.sqrt(sum(x * x for x in ref_group_grad))
        coef = 1.0 if kind == "torch" else min(1.0, MAX_NORM / (total + 1e-6))

        model.loss(mlp_batch(step, rank)).backward()
        opt.step()
        sched.step()  # before collect, as HF Trainer does: the step's own lr must still be reported
        got = diag.collect()
        if kind == "torch":
            opt.zero_grad()
        want = {"diag/grad_norm": total, "diag/grad_norm_clipped": total * coef, "diag/clip_coef": coef}
        for gi, g in enumerate(opt.param_groups):
            name = g["name"]
            live = [p for p in g["params"] if p.requires_grad]
            want[f"diag/{name}/param_norm"] = _norm(live)
            want[f"diag/{name}/grad_norm"] = ref_group_grad[gi]
            want[f"diag/{name}/grad_norm_clipped"] = ref_group_grad[gi] * coef
            un = _norm([a - b for a, b in zip(live, prev[gi])])
            want[f"diag/{name}/update_norm"] = un
            want[f"diag/{name}/update_ratio"] = un / _norm(prev[gi])
            lr, wd = used[gi]
            want[f"diag/{name}/lr"] = lr
            lr_max = g["initial_lr"] if cfg.get("decay") == "independent" else 1.0
            want[f"diag/{name}/effective_decay"] = lr * wd / lr_max
        if kind != "torch":
            opt.zero_grad()
        out.append({"got": got, "want": want})
    return out
