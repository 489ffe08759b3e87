"""Per-rank bodies of the SparseAdamW tests (spawned gloo processes, or called directly with world size 1)."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

from helpers import clone_model, rel_err
from reference_sparse import ReferenceSparseAdamW
from workers import assert_ranks_identical
from zeroadamw import ShardedAdamW, SparseAdamW
from zeroadamw.sparse_adamw import RowBucket

E, D, VOCAB = 6, 8, 20


class TinyMoE(nn.Module):
    """Fused experts [E, out, in] (HF Mixtral layout), a dense-gradient embedding, a sparse (COO) embedding, and
    dense layers. The routing is given per sample, so tests control which experts are idle."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, D)
        self.emb_coo = nn.Embedding(VOCAB, D, sparse=True)
        self.experts = nn.Parameter(torch.randn(E, D, D) * 0.3)
        self.norm = nn.LayerNorm(D)
        self.proj = nn.Linear(D, 5)

    def forward(self, ids, route):
        h = self.emb(ids) + self.emb_coo(ids)
        out = torch.einsum("boi,bi->bo", self.experts[route], h)
        return self.proj(self.norm(out + h))


def batch(step, rank, n=4):
    """Tokens from a shifting window of the vocabulary and experts from a rotating subset: some rows and some
    experts stay idle for several steps, differently on each rank."""
    g = torch.Generator().manual_seed(500 * step + rank)
    lo = (step // 3) % (VOCAB - 6)
    ids = torch.randint(lo, lo + 6, (n,), generator=g)
    active = [(step // 2 + k) % E for k in range(2)] + ([(step + rank) % E] if rank % 2 else [])
    route = torch.tensor(active)[torch.randint(0, len(active), (n,), generator=g)]
    target = torch.randn(n, 5, generator=g)
    return ids, route, target


def loss_of(model, b):
    ids, route, target = b
    return nn.functional.mse_loss(model(ids, route), target)


def groups(model, wd, dtype_rows=True):
    return [
        {"params": [model.experts, model.emb.weight, model.emb_coo.weight], "sparse": "rows", "weight_decay": wd},
        {"params": [model.proj.weight], "weight_decay": wd},
        {"params": [model.norm.weight, model.norm.bias, model.proj.bias], "weight_decay": 0.0},
    ]


def _gather_rows(bucket: RowBucket, rows_grad: torch.Tensor) -> torch.Tensor:
    per = bucket.layout.shard // bucket.D
    local = torch.zeros(per, bucket.D, dtype=rows_grad.dtype)
    local[: rows_grad.shape[0]] = rows_grad
    if dist.is_initialized() and bucket.comm.world_size > 1:
        out = torch.empty(per * bucket.comm.world_size, bucket.D, dtype=rows_grad.dtype)
        dist.all_gather_into_tensor(out, local, group=bucket.comm.group)
    else:
        out = local
    return out[: bucket.R]


def reduced(opt):
    """The averaged gradient and touched mask the optimizer is about to apply, reassembled from its shards."""
    engine = opt.engine
    engine.reduce()
    grads, touched = {}, {}
    for bucket in engine.buckets:
        p = bucket.params[0]
        if isinstance(bucket, RowBucket):
            rows = list(range(bucket.rows_hi - bucket.rows_lo))
            owned = bucket.owned_rows_dense().clone() if rows else torch.zeros(0, bucket.D)
            grads[p] = _gather_rows(bucket, owned).view(p.shape)
            touched[p] = bucket.touched.clone()
        elif not engine.sharded(bucket):  # one process: the update reads param.grad
            for q in bucket.params:
                grads[q] = q.grad.clone()
        else:
            full = torch.empty(bucket.layout.padded, dtype=bucket.shard_grad.dtype)
            if dist.is_initialized() and bucket.comm.world_size > 1:
                dist.all_gather_into_tensor(full, bucket.shard_grad.contiguous(), group=bucket.comm.group)
            else:
                full = torch.cat(bucket.reduced_grads()) if bucket.direct else bucket.shard_grad
            for i, q in enumerate(bucket.params):
                s = bucket.layout.slots[i]
                grads[q] = full[s.offset : s.offset + s.numel].view_as(q).clone()
    return grads, touched


def probe_average(probe, world, step):
    """Independent of the optimizer: every rank's local gradient on the probe, their mean, and the OR of their
    non-zero rows (the definition of touched)."""
    total, touched = {}, {}
    rows = {probe.experts, probe.emb.weight, probe.emb_coo.weight}
    for r in range(world):
        probe.zero_grad(set_to_none=True)
        loss_of(probe, batch(step, r)).backward()
        for p in probe.parameters():
            if p.grad is None:
                continue
            g = p.grad.to_dense() if p.grad.is_sparse else p.grad
            total[p] = g.clone() if p not in total else total[p].add_(g)
            if p in rows:
                nz = g.reshape(g.shape[0], -1).ne(0).any(dim=1)
                touched[p] = nz if p not in touched else touched[p] | nz
    probe.zero_grad(set_to_none=True)
    return {p: g / world for p, g in total.items()}, touched


def sparse_vs_reference(rank, world, cfg):
    torch.manual_seed(0)
    model = TinyMoE()
    dtype = getattr(torch, cfg.get("dtype", "float32"))
    model = model.to(dtype)
    probe = clone_model(model)
    ref_model = clone_model(model).float()
    lr, wd = cfg.get("lr", 1e-2), cfg.get("wd", 0.1)
    opt = SparseAdamW(groups(model, wd), lr=lr, catchup_decay=cfg.get("catchup", True), bucket_size=40,
                      reduce_dtype=torch.float32, decay=cfg.get("decay", "decoupled"))
    ref_rows = [ref_model.experts, ref_model.emb.weight, ref_model.emb_coo.weight]
    ref_dense = [ref_model.proj.weight, ref_model.norm.weight, ref_model.norm.bias, ref_model.proj.bias]
    ref = ReferenceSparseAdamW(ref_rows, [], lr=lr, weight_decay=wd, catchup=cfg.get("catchup", True),
                               decay=cfg.get("decay", "decoupled"))
    from zeroadamw import AdamW  # torch.optim.AdamW's update with our decay modes (decoupled is bit-identical)

    dense_ref = AdamW([{"params": ref_dense[:1], "weight_decay": wd}, {"params": ref_dense[1:], "weight_decay": 0.0}],
                      lr=lr, decay=cfg.get("decay", "decoupled"), impl="reference")
    ours_rows = [model.experts, model.emb.weight, model.emb_coo.weight]
    ours_dense = [model.proj.weight, model.norm.weight, model.norm.bias, model.proj.bias]
    worst = {"param": 0.0, "reduce": 0.0, "idle_checked": 0}
    for step in range(cfg["steps"]):
        probe.load_state_dict(model.state_dict())
        before = {p: p.detach().clone() for p in ours_rows}
        loss_of(model, batch(step, rank)).backward()
        grads, touched = reduced(opt)
        expect_g, expect_t = probe_average(probe, world, step)
        pmap = dict(zip(model.parameters(), probe.parameters()))
        for p in ours_rows:
            assert torch.equal(touched[p], expect_t[pmap[p]]), "touched mask differs from the ranks' non-zero rows"
            worst["reduce"] = max(worst["reduce"], rel_err(grads[p], expect_g[pmap[p]]))
        opt.step()
        opt.zero_grad()
        # teacher-forced reference: the gradients the optimizer applied, the mask it agreed on
        rg = {q: grads[p].float() for p, q in zip(ours_rows, ref_rows)}
        rt = {q: touched[p] for p, q in zip(ours_rows, ref_rows)}
        ref.step(rg, rt)
        for p, q in zip(ours_dense, ref_dense):
            q.grad = grads[p].float()
        dense_ref.step()
        dense_ref.zero_grad()
        for p, q in zip(ours_rows + ours_dense, ref_rows + ref_dense):
            worst["param"] = max(worst["param"], rel_err(p.float(), q))
        for p in ours_rows:  # idle slices did not move at all
            idle = ~touched[p]
            assert torch.equal(p[idle], before[p][idle]), "an idle slice moved"
            worst["idle_checked"] += int(idle.sum())
        assert_ranks_identical(list(model.parameters()))
        with torch.no_grad():  # keep the reference on our weights (only rounding can separate them)
            for p, q in zip(ours_rows + ours_dense, ref_rows + ref_dense):
                q.copy_(p.float())
    # the per-row step counts equal the number of steps each slice was touched (the reference's)
    sd = opt.state_dict()
    index = {p: k for k, p in enumerate(q for g in opt.param_groups for q in g["params"])}
    for p, q in zip(ours_rows, ref_rows):
        steps = sd["state"][index[p]]["step"]
        assert steps.tolist() == [float(s["step"]) for s in ref.slices[q]], (steps, [s["step"] for s in ref.slices[q]])
    return worst


def all_touched_equals_dense(rank, world, steps):
    """Every slice touched every step: SparseAdamW == ShardedAdamW (and hence torch AdamW)."""
    torch.manual_seed(0)
    a = nn.Sequential(nn.Linear(6, 9), nn.Linear(9, 4))
    b = clone_model(a)
    oa = SparseAdamW([{"params": [a[0].weight, a[1].weight], "sparse": "rows"},
                      {"params": [a[0].bias, a[1].bias]}], lr=1e-2, weight_decay=0.1, bucket_size=32)
    ob = ShardedAdamW([{"params": [b[0].weight, b[1].weight]}, {"params": [b[0].bias, b[1].bias]}], lr=1e-2,
                      weight_decay=0.1, bucket_size=32, impl="reference")
    worst = 0.0
    for step in range(steps):
        g = torch.Generator().manual_seed(step * 10 + rank)
        x = torch.randn(8, 6, generator=g)
        for m, o in ((a, oa), (b, ob)):
            m(x).pow(2).mean().backward()
            o.step()
            o.zero_grad()
        worst = max(worst, max(rel_err(p, q) for p, q in zip(a.parameters(), b.parameters())))
    return worst


def cancelling_row(rank, world):
    """Expert 0 gets +g on rank 0 and -g on rank 1: the mean is zero but the row was touched -- it is updated
    (step count +1, decay, its momentum moves it), not skipped."""
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(3, 2))
    opt = SparseAdamW([{"params": [w], "sparse": "rows"}], lr=0.1, weight_decay=0.5, bucket_size=64)
    # step 1: a real gradient on row 0 everywhere, so it has momentum
    w.grad = None
    (w[0] * torch.tensor([1.0, 2.0])).sum().backward()
    opt.step()
    opt.zero_grad()
    before = w.detach().clone()
    sign = 1.0 if rank == 0 else -1.0
    (w[0] * torch.tensor([3.0, -1.0]) * sign).sum().backward()
    opt.step()
    sd = opt.state_dict()
    steps = sd["state"][0]["step"]
    assert steps.tolist() == [2.0, 0.0, 0.0], steps
    assert not torch.equal(w[0], before[0]), "the cancelling row was not updated"
    assert torch.equal(w[1:], before[1:])
    return True


def expert_groups(rank, world):
    """4 ranks, expert parallelism 2 x expert data parallelism 2: ranks {0,1} hold experts A, {2,3} experts B.
    Dense params are reduced over all 4; experts over their pair only. Clipping's global norm counts every
    expert exactly once: sqrt(dense^2 + A^2 + B^2)."""
    pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    mine = pairs[rank // 2]
    torch.manual_seed(0)
    dense = nn.Linear(D, D)
    torch.manual_seed(100 + rank // 2)  # the two expert sets differ
    experts = nn.Parameter(torch.randn(E, D, D) * 0.3)
    opt = SparseAdamW([{"params": list(dense.parameters())},
                       {"params": [experts], "sparse": "rows", "process_group": mine}],
                      lr=1e-2, weight_decay=0.1, max_grad_norm=1e-3, bucket_size=64)
    norms = []
    for step in range(4):
        g = torch.Generator().manual_seed(step * 7 + rank)
        x = torch.randn(5, D, generator=g)
        route = torch.randint(0, 3, (5,), generator=g) + (rank % 2)  # experts 0..3 used, 4..5 idle
        h = dense(x)
        loss = torch.einsum("boi,bi->bo", experts[route], h).pow(2).mean()
        local = torch.autograd.grad(loss, list(dense.parameters()) + [experts], retain_graph=True)
        loss.backward()  # (stage 2 takes the gradients out of param.grad: the reference uses autograd.grad's)
        # the reference norm: dense grads averaged over all 4 ranks, experts over their pair
        dense_avg = [gd.clone() for gd in local[:-1]]
        for gd in dense_avg:
            dist.all_reduce(gd)
            gd.div_(4)
        exp_avg = local[-1].clone()
        dist.all_reduce(exp_avg, group=mine)
        exp_avg.div_(2)
        exp_sq = torch.tensor([exp_avg.double().square().sum().item() if rank in (0, 2) else 0.0], dtype=torch.float64)
        dist.all_reduce(exp_sq)  # one representative per pair: each expert set once
        expect = math.sqrt(sum(gd.double().square().sum().item() for gd in dense_avg) + exp_sq.item())
        opt.step()
        opt.zero_grad()
        norms.append((opt.grad_norm, expect))
    # dense identical on all 4 ranks; experts identical within each pair, different across pairs
    flat = torch.cat([p.detach().reshape(-1) for p in dense.parameters()])
    allf = [torch.empty_like(flat) for _ in range(4)]
    dist.all_gather(allf, flat)
    assert all(torch.equal(allf[0], t) for t in allf)
    e = experts.detach().reshape(-1).clone()
    alle = [torch.empty_like(e) for _ in range(4)]
    dist.all_gather(alle, e)
    assert torch.equal(alle[0], alle[1]) and torch.equal(alle[2], alle[3]) and not torch.equal(alle[0], alle[2])
    return norms


def mixtral_idle_experts(rank, world, steps):
    """Tiny MixtralForCausalLM (from MixtralConfig), SparseAdamW with moe_param_groups, 2 ranks. Rank 0 sends a
    single token per step, so its router picks only 2 of the 4 experts: some experts get no tokens on rank 0 (and
    some on both ranks). No hang, ranks identical, experts idle on every rank unchanged, step counts per expert
    equal the number of steps it had tokens somewhere. (A token counts only if the loss depends on it: the last
    position of a causal-LM sequence has no target, so its experts get no gradient.)"""
    from transformers import MixtralConfig, MixtralForCausalLM

    from zeroadamw import moe_param_groups

    torch.manual_seed(0)
    cfg = MixtralConfig(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
                        num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=32)
    model = MixtralForCausalLM(cfg)
    groups, names = moe_param_groups(model, weight_decay=0.1)
    opt = SparseAdamW(groups, lr=1e-2, bucket_size=2000)
    used: dict[str, set] = {}

    def hook(name):
        def fn(mod, inp, out):
            logits = out[0] if isinstance(out, tuple) else out
            picks = logits.reshape(-1, logits.shape[-1]).topk(2, dim=-1).indices  # [tokens, 2] (batch of 1)
            used.setdefault(name, set()).update(picks[:-1].flatten().tolist())
        return fn

    for i, layer in enumerate(model.model.layers):
        layer.mlp.gate.register_forward_hook(hook(f"model.layers.{i}.mlp.experts"))
    expert_params = {n: p for n, p in model.named_parameters() if n in names["experts_rows"]}
    counts = {n: torch.zeros(4) for n in expert_params}
    idle_on_this_rank = 0
    for step in range(steps):
        used.clear()
        g = torch.Generator().manual_seed(100 * step + rank)
        ids = torch.randint(0, 64, (1, 2 if rank == 0 else 6), generator=g)
        before = {n: p.detach().clone() for n, p in expert_params.items()}
        model(input_ids=ids, labels=ids).loss.backward()
        local = torch.zeros(len(expert_params), 4)
        for k, n in enumerate(expert_params):
            for e in used.get(n.rsplit(".", 1)[0], set()):
                local[k, e] = 1
        idle_on_this_rank += int((local == 0).sum())
        anywhere = local.clone()
        dist.all_reduce(anywhere, op=dist.ReduceOp.MAX)
        opt.step()
        opt.zero_grad()
        for k, (n, p) in enumerate(expert_params.items()):
            counts[n] += anywhere[k]
            for e in range(4):
                if anywhere[k, e] == 0:
                    assert torch.equal(p[e], before[n][e]), f"{n} expert {e} had no tokens anywhere but moved"
        assert_ranks_identical(list(model.parameters()))
    sd = opt.state_dict()
    index = {p: k for k, p in enumerate(q for gr in opt.param_groups for q in gr["params"])}
    for n, p in expert_params.items():
        st = sd["state"].get(index[p])
        got = st["step"] if st is not None else torch.zeros(4)
        assert got.tolist() == counts[n].tolist(), (n, got, counts[n])
    return idle_on_this_rank


def group_without_this_rank(rank, world):
    """A rank given a process group it is not in gets the error before any collective (rank 0, a member, does not
    build an optimizer here: its layout check would wait for rank 1)."""
    only0 = dist.new_group([0])
    if rank == 0:
        return "member"
    w = nn.Parameter(torch.ones(2, 2))
    try:
        SparseAdamW([{"params": [w], "sparse": "rows", "process_group": only0}])
    except ValueError as e:
        assert "does not contain this rank" in str(e)
        return "refused"
    return "accepted"


def coo_memory(rank, world):
    """nn.Embedding(sparse=True) with a 4096 x 64 table, 8 tokens per step: the engine never holds a dense
    gradient (its peak gradient memory stays proportional to the touched rows)."""
    torch.manual_seed(0)
    emb = nn.Embedding(4096, 64, sparse=True)
    opt = SparseAdamW([{"params": [emb.weight], "sparse": "rows"}], lr=1e-2)
    for step in range(3):
        g = torch.Generator().manual_seed(step * 10 + rank)
        emb(torch.randint(0, 4096, (8,), generator=g)).pow(2).sum().backward()
        opt.step()
        opt.zero_grad()
    assert_ranks_identical([emb.weight])
    return opt.engine.peak_grad_bytes, emb.weight.numel() * 4


def sparse_checkpoint(rank, world, root, mode, steps=5):
    """mode 'save': train `steps`, checkpoint, continue 3 steps (reference). mode 'load': load, continue 3 steps."""
    import os

    from zeroadamw import checkpoint as ck

    torch.manual_seed(0)
    model = TinyMoE()
    opt = SparseAdamW(groups(model, 0.1), lr=1e-2, bucket_size=40)
    path = os.path.join(root, "ckpt")
    if mode == "save":
        for step in range(steps):
            loss_of(model, batch(step, rank)).backward()
            opt.step()
            opt.zero_grad()
        ck.save(path, model=model, optimizer=opt)
    else:
        ck.load(path, model=model, optimizer=opt)
    at_load = opt.state_dict()
    for step in range(steps, steps + 3):
        loss_of(model, batch(step, rank)).backward()
        opt.step()
        opt.zero_grad()
    return {"state": at_load, "params": [p.detach().clone() for p in model.parameters()],
            "log_decay": [g["log_decay"] for g in opt.param_groups]}
