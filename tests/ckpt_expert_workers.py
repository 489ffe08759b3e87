"""Per-rank bodies of the expert-parallel checkpoint tests (spawned gloo processes, tests/distributed.py).

Expert parallelism ``n_ep`` x expert data parallelism ``world // n_ep``: ranks ``k*s .. (k+1)*s - 1`` (s = world //
n_ep) form expert group ``k`` and hold expert set ``k`` -- different tensors under the same parameter names
(``experts.w``, row-sharded; ``experts.proj``, a dense param sharded over the expert group). The dense layers are
replicated over the whole world.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn

from zeroadamw import SparseAdamW
from zeroadamw import checkpoint as ck

E, D = 6, 8


class Experts(nn.Module):
    def __init__(self, k: int):
        super().__init__()
        torch.manual_seed(100 + k)  # every expert group holds different experts
        self.w = nn.Parameter(torch.randn(E, D, D) * 0.3)
        self.proj = nn.Parameter(torch.randn(D, D) * 0.2)


class ExpertModel(nn.Module):
    def __init__(self, k: int):
        super().__init__()
        torch.manual_seed(0)
        self.dense = nn.Linear(D, D)
        self.head = nn.Linear(D, 3)
        self.experts = Experts(k)

    def forward(self, x, route):
        h = self.dense(x)
        out = torch.einsum("boi,bi->bo", self.experts.w[route], h) + h @ self.experts.proj
        return self.head(out)


def expert_groups(rank: int, world: int, n_ep: int):
    """Every rank creates every group (new_group is a collective); returns (this rank's group, its index k)."""
    s = world // n_ep
    groups = [dist.new_group(list(range(k * s, (k + 1) * s))) for k in range(n_ep)]
    return groups[rank // s], rank // s


def build(rank: int, world: int, n_ep: int = 2):
    mine, k = expert_groups(rank, world, n_ep)
    model = ExpertModel(k)
    opt = SparseAdamW([
        {"params": list(model.dense.parameters()) + list(model.head.parameters()), "weight_decay": 0.1},
        {"params": [model.experts.w], "sparse": "rows", "process_group": mine, "weight_decay": 0.1},
        {"params": [model.experts.proj], "process_group": mine, "weight_decay": 0.05},
    ], lr=1e-2, bucket_size=64)
    return model, opt, k


def batch(step: int, rank: int):
    g = torch.Generator().manual_seed(1000 * step + rank)
    x = torch.randn(5, D, generator=g)
    route = torch.randint(0, 3, (5,), generator=g) + (step + rank) % 2  # experts 4, 5 stay idle
    return x, route


def train(model, opt, steps, rank):
    for step in steps:
        x, route = batch(step, rank)
        model(x, route).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()


def snapshot(model, opt, k):
    """What this rank holds: its params and the consolidated state of its groups (experts: its expert group's)."""
    return {"k": k, "params": {n: p.detach().clone() for n, p in model.named_parameters()}, "optim": opt.state_dict()}


def save_then_continue(rank, world, root, steps, n_ep=2):
    model, opt, k = build(rank, world, n_ep)
    train(model, opt, range(steps), rank)
    path = os.path.join(root, f"N{world}")
    ck.save(path, model=model, optimizer=opt, extra={"step": steps})
    at_save = snapshot(model, opt, k)
    train(model, opt, [steps], rank)
    return {"at_save": at_save, "final": snapshot(model, opt, k)}


def load_and_continue(rank, world, root, sources, steps, n_ep=2):
    out = {}
    for src in sources:
        model, opt, k = build(rank, world, n_ep)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))  # nothing may survive from initialisation
        assert ck.load(os.path.join(root, src), model=model, optimizer=opt) == {"step": steps}
        loaded = snapshot(model, opt, k)
        train(model, opt, [steps], rank)
        out[src] = {"loaded": loaded, "final": snapshot(model, opt, k)}
    return out


def load_refused(rank, world, root, source, n_ep):
    """Load with another number of expert groups: every rank must raise a CheckpointError (returned here)."""
    model, opt, _ = build(rank, world, n_ep)
    before = [p.detach().clone() for p in model.parameters()]
    try:
        ck.load(os.path.join(root, source), model=model, optimizer=opt)
    except ck.CheckpointError as e:
        assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before)), "a refused load changed weights"
        return str(e)
    return None
