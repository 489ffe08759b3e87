"""Per-rank bodies of the checkpoint tests (run by tests/distributed.py in spawned gloo processes)."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from helpers import llama_loss, param_groups, tiny_llama
from zeroadamw import ShardedAdamW
from zeroadamw import checkpoint as ck

GLOBAL_BATCH = 12  # divisible by 1, 2, 3 and 4: every world size sees the same global batch per step


def global_batch(step: int, seq: int = 10, vocab: int = 97):
    g = torch.Generator().manual_seed(7000 + step)
    return torch.randint(0, vocab, (GLOBAL_BATCH, seq), generator=g)


def local_batch(step: int, rank: int, world: int):
    ids = global_batch(step)
    per = GLOBAL_BATCH // world
    return ids[rank * per : (rank + 1) * per]


def build(dtype=torch.float32, bucket_size=3000):
    model = tiny_llama(seed=0, dtype=dtype)  # final norm frozen
    groups = param_groups(model, lr=2e-3, wd=0.1, no_decay_lr=1e-3)
    # a third group: the embeddings, another lr and wd
    emb = model.model.embed_tokens.weight
    groups[0]["params"] = [p for p in groups[0]["params"] if p is not emb]
    groups.append({"params": [emb], "lr": 1e-3, "weight_decay": 0.01})
    opt = ShardedAdamW(groups, stage=2, bucket_size=bucket_size, max_grad_norm=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 3))
    return model, opt, sched


def train(model, opt, sched, steps, rank, world):
    for step in steps:
        llama_loss(model, local_batch(step, rank, world)).backward()
        opt.step()
        opt.zero_grad()
        sched.step()


def snapshot(model, opt):
    sd = opt.state_dict()
    return {"params": [p.detach().clone() for p in model.parameters()], "optim": sd}


def save_then_continue(rank, world, root, k, j, dtype_name="float32"):
    """Train k steps, checkpoint to root/N{world}, continue j steps (the never-stopped run); return both."""
    dtype = getattr(torch, dtype_name)
    model, opt, sched = build(dtype)
    train(model, opt, sched, range(k), rank, world)
    ck.save(os.path.join(root, f"N{world}"), model=model, optimizer=opt, scheduler=sched, extra={"step": k})
    at_save = snapshot(model, opt)
    train(model, opt, sched, range(k, k + j), rank, world)
    return {"at_save": at_save, "final": snapshot(model, opt)}


def load_and_continue(rank, world, root, sources, k, j, dtype_name="float32", bucket_size=3000):
    """For each source checkpoint: build fresh (different init), load, check the state equals the saved one,
    continue j steps; return the final snapshot per source."""
    dtype = getattr(torch, dtype_name)
    out = {}
    for src in sources:
        torch.manual_seed(123)
        model, opt, sched = build(dtype, bucket_size)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))  # make sure nothing survives from initialisation
        extra = ck.load(os.path.join(root, src), model=model, optimizer=opt, scheduler=sched)
        assert extra == {"step": k}, extra
        assert sched.last_epoch == k, sched.last_epoch
        loaded = snapshot(model, opt)
        train(model, opt, sched, range(k, k + j), rank, world)
        out[src] = {"loaded": loaded, "final": snapshot(model, opt)}
    return out


def crash_while_saving(rank, world, root):
    """Save a good checkpoint, train on, then die on the last rank in the middle of writing the next one."""
    model, opt, sched = build()
    train(model, opt, sched, range(2), rank, world)
    path = os.path.join(root, "ckpt")
    ck.save(path, model=model, optimizer=opt, scheduler=sched, extra={"step": 2})
    train(model, opt, sched, range(2, 4), rank, world)
    if rank == world - 1:
        import torch.distributed.checkpoint.filesystem as fs

        original = fs._write_item
        written = [0]

        def write_then_die(*args, **kwargs):
            if written[0] == 1:
                os._exit(17)  # killed in the middle of writing its shard: one item is on disk, the rest is not
            written[0] += 1
            return original(*args, **kwargs)

        fs._write_item = write_then_die
    ck.save(path, model=model, optimizer=opt, scheduler=sched, extra={"step": 4})
    return "unreachable"


def load_after_crash(rank, world, root):
    model, opt, sched = build()
    extra = ck.load(os.path.join(root, "ckpt"), model=model, optimizer=opt, scheduler=sched)
    assert extra == {"step": 2}, f"loaded {extra}, expected the previous checkpoint"
    assert float(max(st["step"].item() for st in opt.state.values())) == 2
    return True
