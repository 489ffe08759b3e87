"""Per-rank bodies of the DeviceMesh (hierarchical sharding) tests: 4 gloo processes as 2 x 2, 1 x 4, 4 x 1."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from helpers import clone_model, loss_fn, max_state_err, param_groups, reference_grads, rel_err
from workers import assert_ranks_identical, build
from zeroadamw import ShardedAdamW, SparseAdamW
from zeroadamw.mesh import MESH_DIMS


def make_mesh(shape):
    """A ``("replicate", "shard")`` mesh of ``shape``, or ``None`` (the default group, flat)."""
    return None if shape is None else init_device_mesh("cpu", tuple(shape), mesh_dim_names=MESH_DIMS)


def mesh_vs_reference(rank, world_size, cfg):
    """ShardedAdamW over a mesh, ``cfg["steps"]`` steps on this rank's batches; in lockstep torch.optim.AdamW on the
    rank-averaged gradient of every rank's batch (computed at the same weights by a probe). Returns the worst
    relative errors, the state bytes, the owned elements, the counters per dimension and the padded bucket
    sizes (for the communication model)."""
    mesh = make_mesh(cfg["mesh"])
    model, batch = build(cfg)
    probe, ref_model = clone_model(model), clone_model(model)
    opt = ShardedAdamW(param_groups(model), stage=cfg.get("stage", 2), device_mesh=mesh,
                       bucket_size=cfg.get("bucket_size", 64), max_grad_norm=cfg.get("max_grad_norm"),
                       step_in_backward=cfg.get("step_in_backward", False), state_dtype=cfg.get("state_dtype"))
    ref = torch.optim.AdamW(param_groups(ref_model), foreach=False)
    ref_params = list(ref_model.parameters())
    worst = {"param": 0.0, "state": 0.0, "grad_norm": 0.0}
    accum = cfg.get("accum", 1)
    for step in range(cfg["steps"]):
        probe.load_state_dict(model.state_dict())
        if step == cfg["steps"] - 1:
            opt.reset_comm_counters()  # count one steady-state step (after the bucket order is settled)
        for micro in range(accum):
            (loss_fn(model, batch(step, rank, micro)) / accum).backward()
        opt.step()
        opt.zero_grad()
        reference_grads(probe, [[batch(step, r, m) for m in range(accum)] for r in range(world_size)], world_size)
        for q, p in zip(ref_params, probe.parameters()):
            q.grad, p.grad = p.grad, None
        grads = [q.grad for q in ref_params if q.grad is not None]
        ref_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item()
        if cfg.get("max_grad_norm"):
            torch.nn.utils.clip_grad_norm_(ref_params, cfg["max_grad_norm"])
        ref.step()
        ref.zero_grad()
        if opt.grad_norm is not None:
            worst["grad_norm"] = max(worst["grad_norm"], abs(opt.grad_norm - ref_norm) / ref_norm)
        for p, q in zip(model.parameters(), ref_params):
            worst["param"] = max(worst["param"], rel_err(p, q))
        assert_ranks_identical(list(model.parameters()))
    worst["counters"] = opt.comm_counters(by_dim=True)  # before state_dict(), which all-gathers the state
    worst["state"] = max_state_err(opt.state_dict(), ref.state_dict())
    worst["state_bytes"] = opt.state_bytes()
    worst["buckets"] = [(b.layout.padded, b.reduce_dtype.itemsize, b.dtype.itemsize) for b in opt.engine.buckets]
    worst["trainable"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return worst


class TinyMoE(torch.nn.Module):
    """An embedding and 4 experts (a [E, d, d] tensor), each token routed to expert ``id % 4``: rows and experts
    that no token of a rank used get zero gradients there."""

    def __init__(self, vocab=64, d=16, experts=4):
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, d)
        self.experts = torch.nn.Parameter(torch.randn(experts, d, d) / d**0.5)
        self.out = torch.nn.Linear(d, vocab)

    def forward(self, ids):
        x = self.emb(ids)
        w = self.experts[ids % self.experts.shape[0]]  # [..., d, d]
        return self.out(torch.tanh((x.unsqueeze(-2) @ w).squeeze(-2)))


def sparse_mesh_vs_flat(rank, world_size, shape, steps, debug=False):
    """SparseAdamW over a mesh equals SparseAdamW over the flat world -- rows of the embedding and experts (lazy,
    idle ones on some ranks), a dense group -- in fp64 (the mesh sums the ranks' gradients in another order;
    in fp32 that rounding can flip the sign of a near-cancelling element, which Adam's first step turns into a
    full lr step): the hierarchy changes who holds what, not the result."""
    runs = []
    for mesh in (make_mesh(shape), None):
        torch.manual_seed(0)
        model = TinyMoE().double()
        groups = [{"params": [model.emb.weight, model.experts], "sparse": "rows"},
                  {"params": list(model.out.parameters()), "weight_decay": 0.0}]
        opt = SparseAdamW(groups, lr=1e-2, weight_decay=0.1, device_mesh=mesh, bucket_size=512)
        for step in range(steps):
            g = torch.Generator().manual_seed(1000 * step + rank)
            ids = torch.randint(0, 16 if rank % 2 else 64, (4, 8), generator=g)  # rows 16.. idle on odd ranks
            if step % 2:
                ids = ids - ids % 4  # every token to expert 0: experts 1-3 idle everywhere this step
            torch.nn.functional.cross_entropy(model(ids).flatten(0, 1), ids.flatten()).backward()
            opt.step()
            opt.zero_grad()
        assert_ranks_identical(list(model.parameters()))
        runs.append({n: p.detach().clone() for n, p in model.named_parameters()})
    errs = {n: rel_err(runs[0][n], runs[1][n]) for n in runs[0]}
    return max(errs.values()) if not debug else errs


def bad_mesh(rank, world_size):
    """Meshes the optimizer refuses, each with the fix named."""
    msgs = []
    model, _ = build({"model": "mlp"})
    for mesh, kw in ((init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp")), {}),
                     (init_device_mesh("cpu", (2, 2), mesh_dim_names=MESH_DIMS), {"process_group": dist.group.WORLD}),
                     ("not a mesh", {})):
        try:
            ShardedAdamW(model.parameters(), device_mesh=mesh, **kw)
        except (ValueError, TypeError) as e:
            msgs.append(f"{type(e).__name__}: {e}")
        else:
            msgs.append("accepted")
    return msgs


# ------------------------------------------------------------------------------------- checkpoints across meshes
def _ckpt_build(shape):
    """ckpt_workers' model (tiny LLaMA, three param groups, clipping, a scheduler) over a mesh (``None``: flat)."""
    import ckpt_workers as C

    model = C.tiny_llama(seed=0)
    groups = C.param_groups(model, lr=2e-3, wd=0.1, no_decay_lr=1e-3)
    emb = model.model.embed_tokens.weight
    groups[0]["params"] = [p for p in groups[0]["params"] if p is not emb]
    groups.append({"params": [emb], "lr": 1e-3, "weight_decay": 0.01})
    opt = ShardedAdamW(groups, stage=2, bucket_size=3000, max_grad_norm=1.0, device_mesh=make_mesh(shape))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 3))
    return model, opt, sched


def mesh_ckpt_save(rank, world, root, shape, k, j):
    """Train k steps over ``shape``, save to root/<name>, continue j steps: the never-stopped run."""
    import os

    import ckpt_workers as C
    from zeroadamw import checkpoint as ck

    model, opt, sched = _ckpt_build(shape)
    C.train(model, opt, sched, range(k), rank, world)
    ck.save(os.path.join(root, _name(shape, world)), model=model, optimizer=opt, scheduler=sched, extra={"step": k})
    at_save = C.snapshot(model, opt)
    C.train(model, opt, sched, range(k, k + j), rank, world)
    return {"at_save": at_save, "final": C.snapshot(model, opt)}


def mesh_ckpt_load(rank, world, root, shape, sources, k, j):
    """Load each source into a fresh model over ``shape`` (different init), snapshot, continue j steps."""
    import os

    import ckpt_workers as C
    from zeroadamw import checkpoint as ck

    out = {}
    for src in sources:
        torch.manual_seed(123)
        model, opt, sched = _ckpt_build(shape)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        assert ck.load(os.path.join(root, src), model=model, optimizer=opt, scheduler=sched) == {"step": k}
        loaded = C.snapshot(model, opt)
        C.train(model, opt, sched, range(k, k + j), rank, world)
        out[src] = {"loaded": loaded, "final": C.snapshot(model, opt)}
    return out


def _name(shape, world):
    return f"flat{world}" if shape is None else "x".join(map(str, shape))
