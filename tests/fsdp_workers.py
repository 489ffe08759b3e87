"""Per-rank bodies of the FSDP2 tests: our optimizers as plain optimizers on ``fully_shard``'s DTensor shards."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from helpers import llama_batch, llama_loss, param_groups, tiny_llama
from zeroadamw import AdamW, ShardedAdamW, SparseAdamW

OPTIMIZERS = {"ShardedAdamW": ShardedAdamW, "SparseAdamW": SparseAdamW, "AdamW": AdamW}


def fsdp_model(mesh_shape, seed=0, dtype=torch.float32):
    """A tiny LLaMA with every decoder layer and the root ``fully_shard``-ed over a 1-D mesh (``(N,)``) or an HSDP
    mesh (``(replicate, shard)``)."""
    from torch.distributed.fsdp import fully_shard

    model = tiny_llama(seed=seed, dtype=dtype)
    if len(mesh_shape) == 1:
        mesh = init_device_mesh("cpu", tuple(mesh_shape))
    else:
        mesh = init_device_mesh("cpu", tuple(mesh_shape), mesh_dim_names=("replicate", "shard"))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _local(t):
    return t.to_local() if hasattr(t, "to_local") else t


def _ref_optimizer(model, kw):
    """torch's optimizer for our ``kw``: fused (our impl="auto" on CPU runs the fused kernel: bit for bit the same
    math); ``decay="l2"`` is torch's Adam with weight_decay (L2 added to the gradient)."""
    hyper = {k: v for k, v in kw.items() if k in ("lr", "weight_decay")}
    cls = torch.optim.Adam if kw.get("decay") == "l2" else torch.optim.AdamW
    return cls(param_groups(model), fused=True, **hyper)


def fsdp_vs_torch(rank, world_size, mesh_shape, specs, steps=10):
    """For each ``(name, kw)``: ``steps`` steps of ours and of torch's optimizer on two identical FSDP2 models fed
    the same batches (clipping: torch's clip_grad_norm_ on the reference). Returns per spec the worst relative
    difference of the local param shards and local state shards, and facts about the state."""
    out = []
    for name, kw in specs:
        models = [fsdp_model(mesh_shape), fsdp_model(mesh_shape)]
        opts = [OPTIMIZERS[name](param_groups(models[0]), **kw), _ref_optimizer(models[1], kw)]
        worst = {"param": 0.0, "state": 0.0, "norm": 0.0}
        clip = kw.get("max_grad_norm")
        for step in range(steps):
            for model, opt in zip(models, opts):
                llama_loss(model, llama_batch(step, rank)).backward()
                if opt is opts[1]:
                    # in param-group order, as ours sums them (the fp32 norm depends on the order)
                    norm = torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]],
                                                          clip or float("inf"))
                    if getattr(opts[0], "grad_norm", None) is not None:
                        ref = norm.full_tensor().item() if hasattr(norm, "full_tensor") else norm.item()
                        worst["norm"] = max(worst["norm"], abs(opts[0].grad_norm - ref) / ref)
                opt.step()
                opt.zero_grad()
            for p, q in zip(models[0].parameters(), models[1].parameters()):
                a, b = _local(p).detach(), _local(q).detach()
                worst["param"] = max(worst["param"], ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item())
        for p, q in zip(models[0].parameters(), models[1].parameters()):
            s, r = opts[0].state[p], opts[1].state[q]
            for k in ("exp_avg", "exp_avg_sq"):
                if s.get(k) is not None:
                    a, b = _local(s[k]), _local(r[k])
                    worst["state"] = max(worst["state"], ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item())
        states = [s for s in opts[0].state.values() if s]
        worst["dtensor_state"] = all(type(s["exp_avg"]).__name__ == "DTensor" for s in states)
        worst["state_bytes"] = opts[0].state_bytes()
        worst["local_numel"] = sum(_local(p).numel() for p in models[0].parameters() if p.requires_grad)
        out.append(worst)
    return out


def _mlp(seed, dtype):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(128, 128), torch.nn.GELU(), torch.nn.Linear(128, 128)).to(dtype)


def fsdp_precision(rank, world_size, mesh_shape, specs, steps=8):
    """bf16 weights, FSDP2-sharded (local shards of 64 rows x 128 = 8192 elements: int8 blocks of 256 start on the
    same elements as unsharded). Ours on the shards vs the same optimizer on an unsharded copy fed the full
    gradients: the precision-aware state is elementwise (Kahan) or per 256-element block (int8), so both runs
    are equal bit for bit; bf16 moments round stochastically by local element index, so those are close only.
    Returns per spec the worst difference, the storage kinds and the state bytes of this rank."""
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", tuple(mesh_shape))
    out = []
    for name, kw in specs:
        model, ref_model = _mlp(0, torch.bfloat16), _mlp(0, torch.bfloat16)
        for m in (model[0], model[2], model):
            fully_shard(m, mesh=mesh)
        opt = OPTIMIZERS[name](model.parameters(), lr=1e-2, weight_decay=0.1, **kw)
        ref = AdamW(ref_model.parameters(), lr=1e-2, weight_decay=0.1, **{k: v for k, v in kw.items()
                                                                          if k != "master_dtype"})
        err = 0.0
        for step in range(steps):
            x = torch.randn(8, 128, generator=torch.Generator().manual_seed(100 * step + rank)).to(torch.bfloat16)
            model(x).float().square().mean().backward()
            opt.step()
            for p, q in zip(model.parameters(), ref_model.parameters()):
                q.grad = p.grad.full_tensor()
            ref.step()
            opt.zero_grad()
            ref.zero_grad()
            for p, q in zip(model.parameters(), ref_model.parameters()):
                err = max(err, ((p.full_tensor().float() - q.float()).abs().max() / q.float().abs().max()).item())
        kinds = sorted({f"{k}:{str(_local(v).dtype).replace('torch.', '')}" for s in opt.state.values()
                        for k, v in s.items() if k != "step"})
        out.append({"err": err, "kinds": kinds, "state_bytes": opt.state_bytes(),
                    "local_numel": sum(_local(p).numel() for p in model.parameters())})
    return out


def fsdp_refusals(rank, world_size):
    """What ShardedAdamW refuses on FSDP2 params, and the skip of a non-finite step on every rank."""
    from torch.distributed.device_mesh import init_device_mesh

    model = fsdp_model((world_size,))
    msgs = []
    for kw in ({"device_mesh": init_device_mesh("cpu", (world_size,))}, {"step_in_backward": True},
               {"rule": "adalomo"}):
        try:
            ShardedAdamW(model.parameters(), **kw)
            msgs.append("accepted")
        except ValueError as e:
            msgs.append(str(e))
    opt = ShardedAdamW(model.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler("cpu")
    scaler.scale(llama_loss(model, llama_batch(0, rank))).backward()
    try:
        scaler.step(opt)
        msgs.append("accepted")
    except TypeError as e:
        msgs.append(str(e))
    opt.zero_grad()
    before = [_local(p).detach().clone() for p in model.parameters()]
    llama_loss(model, llama_batch(1, rank)).backward()
    if rank == 1:  # a NaN in one rank's local shard only
        next(p for p in model.parameters() if _local(p.grad).numel()).grad._local_tensor[0] = float("nan")
    opt.step()
    unchanged = all(torch.equal(a, _local(p).detach()) for a, p in zip(before, model.parameters()))
    return {"msgs": msgs, "skipped": opt.last_step_skipped, "unchanged": unchanged, "skips": opt.skipped_steps,
            "dcp": _dcp_roundtrip(rank)}


def _dcp_roundtrip(rank) -> bool:
    """torch's own FSDP2 checkpoint helpers (get/set_optimizer_state_dict) on ShardedAdamW: state saved after 2
    steps, set into a fresh optimizer, one more step each: bit for bit the same weights."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    model = fsdp_model((dist.get_world_size(),))
    opt = ShardedAdamW(param_groups(model), lr=1e-2)
    for step in range(2):
        llama_loss(model, llama_batch(step, rank)).backward()
        opt.step()
        opt.zero_grad()
    osd = get_optimizer_state_dict(model, opt)
    model2 = fsdp_model((dist.get_world_size(),), seed=3)
    model2.load_state_dict(model.state_dict())
    opt2 = ShardedAdamW(param_groups(model2), lr=1e-2)
    set_optimizer_state_dict(model2, opt2, osd)
    for m, o in ((model, opt), (model2, opt2)):
        llama_loss(m, llama_batch(5, rank)).backward()
        o.step()
        o.zero_grad()
    return all(torch.equal(_local(p), _local(q)) for p, q in zip(model.parameters(), model2.parameters()))


# ------------------------------------------------------------------------------------------ checkpoints
def _full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _snapshot(model, opt):
    """Full (unsharded) params and optimizer state by parameter name: comparable across FSDP2 meshes and flat
    ShardedAdamW."""
    names = {p: n for n, p in model.named_parameters()}
    params = {n: _full(p.detach()).clone() for n, p in model.named_parameters()}
    if isinstance(opt, ShardedAdamW) and not opt._check_plain():
        sd = opt.state_dict()  # consolidated, torch format
        ids = [p for g in opt.param_groups for p in g["params"]]
        state = {names[ids[i]]: {k: v.reshape(ids[i].shape).clone() for k, v in st.items() if k != "step"}
                 | {"step": float(st["step"])} for i, st in sd["state"].items()}
    else:
        state = {names[p]: {k: _full(v).clone() for k, v in st.items() if k != "step"} | {"step": float(st["step"])}
                 for p, st in opt.state.items() if st}
    return {"params": params, "state": state}


def _build(kind, name, seed=0):
    """("fsdp", shape) -> an FSDP2 model and our optimizer ``name`` on it; ("flat", None) -> ShardedAdamW over the
    world (or one process)."""
    where, shape = kind
    model = fsdp_model(shape, seed=seed) if where == "fsdp" else tiny_llama(seed=seed)
    opt = OPTIMIZERS[name](param_groups(model)) if where == "fsdp" else ShardedAdamW(param_groups(model),
                                                                                     bucket_size=3000)
    return model, opt


def _train(model, opt, steps, rank, world):
    for step in steps:
        ids = llama_batch(step, 0, n=4)  # the same global batch on every rank...
        per = ids.shape[0] // world
        llama_loss(model, ids[rank * per : (rank + 1) * per]).backward()  # ...split by rank
        opt.step()
        opt.zero_grad()


def fsdp_ckpt_save(rank, world, root, kind, name, k, j):
    import os

    from zeroadamw import checkpoint as ck

    model, opt = _build(kind, name)
    _train(model, opt, range(k), rank, world)
    ck.save(os.path.join(root, "ckpt"), model=model, optimizer=opt, extra={"step": k})
    at_save = _snapshot(model, opt)
    _train(model, opt, range(k, k + j), rank, world)
    return {"at_save": at_save, "final": _snapshot(model, opt)}


def fsdp_ckpt_load(rank, world, root, kind, name, k, j):
    import os

    from zeroadamw import checkpoint as ck

    model, opt = _build(kind, name, seed=5)  # another init: nothing survives but what is loaded
    assert ck.load(os.path.join(root, "ckpt"), model=model, optimizer=opt) == {"step": k}
    loaded = _snapshot(model, opt)
    _train(model, opt, range(k, k + j), rank, world)
    return {"loaded": loaded, "final": _snapshot(model, opt)}


def fsdp_diagnostics(rank, world_size, mesh_shape, name):
    """zeroadamw.diagnostics on an FSDP2 model (ours and torch's optimizer) vs the same numbers computed from the
    full tensors: param / grad / update norms per group, equal on every rank."""
    from zeroadamw.diagnostics import Diagnostics

    model = fsdp_model(mesh_shape)
    opt = OPTIMIZERS[name](param_groups(model), lr=1e-2) if name != "torch" else torch.optim.AdamW(
        param_groups(model), lr=1e-2)
    diag = Diagnostics(opt)
    llama_loss(model, llama_batch(0, rank)).backward()
    opt.step()
    opt.zero_grad()
    diag.snapshot()
    before = [[p.full_tensor().clone() for p in g["params"] if p.requires_grad] for g in opt.param_groups]
    llama_loss(model, llama_batch(1, rank)).backward()
    grads = [[p.grad.full_tensor() for p in g["params"] if p.grad is not None] for g in opt.param_groups]
    opt.step()
    rec = diag.collect()
    want = {}
    for gi, g in enumerate(opt.param_groups):
        now = [p.full_tensor() for p in g["params"] if p.requires_grad]  # (the frozen final norm: not counted)
        norm = lambda ts: float(torch.sqrt(sum(t.double().square().sum() for t in ts)))  # noqa: E731
        want[f"diag/group{gi}/param_norm"] = norm(now)
        want[f"diag/group{gi}/grad_norm"] = norm(grads[gi])
        want[f"diag/group{gi}/update_norm"] = norm([a - b for a, b in zip(now, before[gi])])
    return max(abs(rec[k] - v) / v for k, v in want.items())
