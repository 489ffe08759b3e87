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


def build_small():
    """A small MLP under a stage-2 ShardedAdamW (no transformers import: these workers must start fast)."""
    from helpers import MLP

    torch.manual_seed(0)
    model = MLP()
    opt = ShardedAdamW(param_groups(model), stage=2, bucket_size=64)
    return model, opt, torch.optim.lr_scheduler.StepLR(opt, 2)


def train_small(model, opt, sched, steps, rank):
    from helpers import mlp_batch

    for step in steps:
        model.loss(mlp_batch(step, rank)).backward()
        opt.step()
        opt.zero_grad()
        sched.step()


def crc_per_rank(rank, world, root):
    """Save with small files (several per rank) and record which files this rank computed a CRC-32 of."""
    model, opt, sched = build_small()
    train_small(model, opt, sched, range(1), rank)
    seen = []
    original = ck._crc32

    def counting(path):
        seen.append(os.path.basename(path))
        return original(path)

    ck._crc32 = counting
    try:
        ck.save(os.path.join(root, "c"), model=model, optimizer=opt, max_file_bytes=400)
    finally:
        ck._crc32 = original
    return seen


class _FailingJson:
    """Stands in for the ``json`` module inside zeroadamw.checkpoint on one rank: writing the metadata fails."""

    def __getattr__(self, name):
        import json

        return getattr(json, name)

    def dump(self, *args, **kwargs):
        raise OSError(28, "No space left on device (injected)")


class _FailingSwapOs:
    """Stands in for the ``os`` module inside zeroadamw.checkpoint on one rank: moving the new checkpoint into
    place (the second rename of the swap, after the old one was moved aside) fails."""

    def __getattr__(self, name):
        return getattr(os, name)

    def rename(self, src, dst):
        if ".tmp-" in os.path.basename(src):
            raise OSError(13, "Permission denied (injected)")
        return os.rename(src, dst)


def failing_save(rank, world, root, where):
    """A good checkpoint, then a save whose rank-0-only part fails (``where``: "meta" or "swap"). Returns what
    this rank raised, and what it then loads from the path (the previous checkpoint, on every rank)."""
    model, opt, sched = build_small()
    train_small(model, opt, sched, range(2), rank)
    path = os.path.join(root, "ckpt")
    ck.save(path, model=model, optimizer=opt, scheduler=sched, extra={"step": 2})
    train_small(model, opt, sched, range(2, 3), rank)
    if rank == 0:
        if where == "meta":
            ck.json = _FailingJson()
        else:
            ck.os = _FailingSwapOs()
    error = None
    try:
        ck.save(path, model=model, optimizer=opt, scheduler=sched, extra={"step": 3})
    except ck.CheckpointError as e:
        error = str(e)
    finally:
        import json

        ck.json, ck.os = json, os
    model2, opt2, sched2 = build_small()
    extra = ck.load(path, model=model2, optimizer=opt2, scheduler=sched2)
    steps = float(max(st["step"].max().item() for st in opt2.state.values()))
    _barrier_all()
    return {"error": error, "extra": extra, "steps": steps, "listing": sorted(os.listdir(root))}


def _barrier_all():
    if dist.is_initialized():
        dist.barrier()
