"""Per-rank bodies of the collective tests (zeroadamw.comm): every reduce-scatter / all-gather path against a
reference all-reduce, several in flight at once, a subgroup, in place."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from zeroadamw.comm import Comm


def _inputs(rank, n, numel, dtype, seed=0):
    g = torch.Generator().manual_seed(seed * 97 + rank)
    return torch.randn(n * numel, generator=g).to(dtype)


def collectives_match_reference(rank, world_size, dtype_name):
    """Every mode of reduce-scatter and all-gather against an all-reduce (and a cat) of the same inputs; four
    collectives in flight at once, waited in reverse order; bytes counted as the ring algorithms send."""
    dtype = getattr(torch, dtype_name)
    n, out = world_size, {}
    for rs_mode in ("p2p", "native", "allreduce"):
        for ag_mode in ("p2p", "native"):
            os.environ["ZEROADAMW_GLOO_REDUCE_SCATTER"] = rs_mode
            os.environ["ZEROADAMW_GLOO_ALL_GATHER"] = ag_mode
            comm = Comm()
            sizes = [1, 5, 64, 1000]
            inps = [_inputs(rank, n, c, dtype, seed=c) for c in sizes]
            refs = []
            for x in inps:
                r = x.clone().float()
                dist.all_reduce(r)
                refs.append(r)
            outs = [torch.empty(c, dtype=dtype) for c in sizes]
            hs = [comm.reduce_scatter(o, x.clone(), async_op=True) for o, x in zip(outs, inps)]
            for h in reversed(hs):
                h.wait()
            for c, o, r in zip(sizes, outs, refs):
                tol = 0 if dtype == torch.float32 and n <= 2 else 2e-2 if dtype == torch.bfloat16 else 1e-5
                torch.testing.assert_close(o.float(), r[rank * c : (rank + 1) * c], rtol=tol, atol=tol)
            # all-gather: separate input, and in place (the input is the output's own slice)
            shards = [_inputs(rank, 1, c, dtype, seed=c + 7) for c in sizes]
            gathered = [torch.full((n * c,), -1.0, dtype=dtype) for c in sizes]
            hs = [comm.all_gather(g, s, async_op=True) for g, s in zip(gathered, shards)]
            inplace = [torch.full((n * c,), -1.0, dtype=dtype) for c in sizes]
            for buf, s, c in zip(inplace, shards, sizes):
                buf[rank * c : (rank + 1) * c].copy_(s)
            hs += [comm.all_gather(b, b[rank * c : (rank + 1) * c], async_op=True) for b, c in zip(inplace, sizes)]
            for h in reversed(hs):
                h.wait()
            for c, g, b in zip(sizes, gathered, inplace):
                expect = torch.cat([_inputs(r, 1, c, dtype, seed=c + 7) for r in range(n)])
                assert torch.equal(g, expect), (rs_mode, ag_mode, c)
                assert torch.equal(b, expect), (rs_mode, ag_mode, c, "in place")
            out[(rs_mode, ag_mode)] = comm.counters()
    return out


def subgroup_and_interleaving(rank, world_size):
    """p2p collectives on a subgroup (global ranks differ from group ranks) interleaved with ones on the world
    group and with a plain all-reduce in flight: tags never cross."""
    odd = dist.new_group([r for r in range(world_size) if r % 2 == 1])
    comm_w = Comm()
    sub = Comm(odd) if rank % 2 == 1 else None
    x = _inputs(rank, world_size, 33, torch.float32, seed=3)
    ref = x.clone()
    dist.all_reduce(ref)
    o_w = torch.empty(33)
    h1 = comm_w.reduce_scatter(o_w, x.clone())
    side = torch.ones(10)
    h2 = dist.all_reduce(side, async_op=True)
    if sub is not None:
        m = sub.world_size
        y = _inputs(rank, m, 17, torch.float32, seed=4)
        yref = y.clone()
        dist.all_reduce(yref, group=odd)
        o_s = torch.empty(17)
        g_s = torch.empty(m * 17)
        hs1 = sub.reduce_scatter(o_s, y.clone())
        hs2 = sub.all_gather(g_s, torch.full((17,), float(rank)))
        hs2.wait()
        hs1.wait()
        torch.testing.assert_close(o_s, yref[sub.rank * 17 : (sub.rank + 1) * 17])
        members = [r for r in range(world_size) if r % 2 == 1]
        assert torch.equal(g_s, torch.cat([torch.full((17,), float(r)) for r in members]))
    h2.wait()
    h1.wait()
    torch.testing.assert_close(o_w, ref[rank * 33 : (rank + 1) * 33])
    assert torch.equal(side, torch.full((10,), float(world_size)))
    return True


def scratch_is_checked(rank, world_size):
    os.environ["ZEROADAMW_GLOO_REDUCE_SCATTER"] = "p2p"
    comm = Comm()
    x = torch.ones(world_size * 8)
    try:
        comm.reduce_scatter(torch.empty(8), x, scratch=torch.empty(3))
    except ValueError as e:
        msg = str(e)
    else:
        msg = None
    good = torch.empty((world_size - 2) * 8)
    out = torch.empty(8)
    comm.reduce_scatter(out, x, scratch=good, async_op=False)
    assert torch.equal(out, torch.full((8,), float(world_size)))
    return msg
