"""Per-rank bodies of the params-as-views / deferred all-gather / buffer-pool tests: every crossing is checked
against the same run without the feature (bit-identical: the feature only moves bytes)."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from helpers import clone_model, llama_batch, llama_loss, tiny_llama
from workers import assert_ranks_identical, expect_error
from zeroadamw import ShardedAdamW


def _train(model, opt, rank, steps, start=0):
    losses = []
    for s in range(start, start + steps):
        loss = llama_loss(model, llama_batch(s, rank))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def _same_params(a, b, what):
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), f"{what}: {n} differs by {(p - q).abs().max().item()}"


def _bound(opt):
    """Every trainable param of every bucket lives in its bucket's flat buffer."""
    for bucket in opt.engine.buckets:
        assert bucket.flat is not None, bucket
        for p in bucket.params:
            assert p.untyped_storage().data_ptr() == bucket.flat.untyped_storage().data_ptr(), bucket


def views_crossings(rank, world_size, dtype_name):
    dtype = getattr(torch, dtype_name)
    base = tiny_llama(dtype=dtype)
    ma, mb = clone_model(base), clone_model(base)
    oa = ShardedAdamW(ma.parameters(), lr=1e-2, weight_decay=0.1, bucket_size=2000)
    ob = ShardedAdamW(mb.parameters(), lr=1e-2, weight_decay=0.1, bucket_size=2000, param_views=False)
    _bound(oa)
    assert all(b.flat is None for b in ob.engine.buckets)
    # 1. the default (views, in-place all-gather) against the copy-out path: bit-identical
    assert _train(ma, oa, rank, 3) == _train(mb, ob, rank, 3)
    _same_params(ma, mb, "views vs copy-out")
    # 2. p.data replaced on every rank between steps: found, bound again with the new values
    for m in (ma, mb):
        for p in m.parameters():
            p.data = p.detach() * 0.5
    assert _train(ma, oa, rank, 2, start=3) == _train(mb, ob, rank, 2, start=3)
    _same_params(ma, mb, "after p.data = ...")
    _bound(oa)
    # 3. model.load_state_dict (copies in place: the views keep working)
    sd = {k: v.clone() for k, v in base.state_dict().items()}
    ma.load_state_dict(sd)
    mb.load_state_dict(sd)
    _same_params(ma, mb, "loaded")
    assert _train(ma, oa, rank, 2, start=5) == _train(mb, ob, rank, 2, start=5)
    _same_params(ma, mb, "after load_state_dict")
    _bound(oa)
    assert_ranks_identical(list(ma.parameters()))
    # 4. the optimizer's state round trip into a fresh optimizer over the same (bound) params
    sd_opt = oa.state_dict()
    oc = ShardedAdamW(ma.parameters(), lr=1e-2, weight_decay=0.1, bucket_size=2000)
    del oa
    oc.load_state_dict(sd_opt)
    _bound(oc)
    ob2 = ob
    assert _train(ma, oc, rank, 2, start=7) == _train(mb, ob2, rank, 2, start=7)
    _same_params(ma, mb, "rebuilt optimizer")
    # 5. a dtype change after the optimizer was built: refused on every rank, weights untouched
    ma.to(torch.float64)
    before = [p.detach().clone() for p in ma.parameters()]
    llama_loss(ma, llama_batch(9, rank)).backward()
    msg = expect_error(oc.step, ValueError, "convert the model first")
    assert all(torch.equal(p, q) for p, q in zip(ma.parameters(), before))
    return msg


def sib_rebind_and_versions(rank, world_size):
    """Fused step in backward updates during backward: a p.data replaced before it is bound again there (not only
    at step()); and the in-place all-gather bumps every param's version on every rank, as a copy would."""
    base = tiny_llama()
    ma, mb = clone_model(base), clone_model(base)
    kw = dict(lr=1e-2, weight_decay=0.1, bucket_size=1500, step_in_backward=True)
    oa = ShardedAdamW(ma.parameters(), **kw)
    ob = ShardedAdamW(mb.parameters(), param_views=False, **kw)
    assert _train(ma, oa, rank, 2) == _train(mb, ob, rank, 2)
    for m in (ma, mb):
        for p in m.parameters():
            p.data = p.detach() * 0.5
    versions = [p._version for p in ma.parameters() if p.requires_grad]
    assert _train(ma, oa, rank, 2, start=2) == _train(mb, ob, rank, 2, start=2)
    _same_params(ma, mb, "fused step in backward after p.data = ...")
    _bound(oa)
    assert_ranks_identical(list(ma.parameters()))
    after = [p._version for p in ma.parameters() if p.requires_grad]
    assert all(b > a for a, b in zip(versions, after)), (versions, after)
    return True


def deferred_gather(rank, world_size, sib):
    """overlap_param_gather: the all-gathers stay in flight after step() and the next forward waits per module
    -- losses and params bit-identical to waiting in step(); wait_params() and state_dict() wait too."""
    base = tiny_llama()
    ma, mb = clone_model(base), clone_model(base)
    kw = dict(lr=1e-2, weight_decay=0.1, bucket_size=1500, step_in_backward=sib)
    oa = ShardedAdamW(ma.parameters(), overlap_param_gather=True, **kw)
    ob = ShardedAdamW(mb.parameters(), **kw)
    in_flight = []
    for s in range(4):
        la = _train(ma, oa, rank, 1, start=s)
        in_flight.append(len(oa.engine.gathers))
        lb = _train(mb, ob, rank, 1, start=s)
        assert la == lb, (s, la, lb)
    assert min(in_flight) == len(oa.engine.buckets), in_flight  # every bucket's gather was left to the forward
    with torch.no_grad():  # an evaluation forward waits as well
        ea, eb = llama_loss(ma, llama_batch(50, rank)).item(), llama_loss(mb, llama_batch(50, rank)).item()
    assert ea == eb and not oa.engine.gathers.pending
    _train(ma, oa, rank, 1, start=4)
    _train(mb, ob, rank, 1, start=4)
    assert oa.engine.gathers.pending
    oa.state_dict()  # a collective that reads params: waits first
    assert not oa.engine.gathers.pending
    _same_params(ma, mb, "after state_dict")
    _train(ma, oa, rank, 1, start=5)
    _train(mb, ob, rank, 1, start=5)
    oa.wait_params()
    _same_params(ma, mb, "after wait_params")
    assert_ranks_identical(list(ma.parameters()))
    return in_flight


def pool_is_steady(rank, world_size, sib):
    """The gradient buffers come from a pool that stops growing after the first step, within the in-flight
    bound; peak counted gradient memory is unchanged by the pool."""
    model = tiny_llama()
    opt = ShardedAdamW(model.parameters(), lr=1e-2, bucket_size=1500, step_in_backward=sib)
    held = []
    for s in range(5):
        _train(model, opt, rank, 1, start=s)
        held.append(opt.engine.pool.bytes)
    assert len(set(held[2:])) == 1, held  # steady from the third step on
    eng = opt.engine
    pool = eng.pool
    for kind, largest in (("full", max(b.layout.padded for b in eng.buckets)),
                          ("shard", max(b.layout.shard for b in eng.buckets))):
        bufs = pool.held(kind)
        # never more buffers than were in use at once, none larger than the largest request
        assert len(bufs) == pool.peak_in_use[kind], (kind, len(bufs), pool.peak_in_use)
        assert all(b.numel() <= largest for b in bufs), kind
    # stage 2 keeps few full-size buffers in flight; the fused step in backward also frees its shards as it goes
    assert pool.peak_in_use["full"] <= eng.max_inflight + 2, pool.peak_in_use
    if sib:
        assert pool.peak_in_use["shard"] <= 2 * eng.max_inflight + 2, pool.peak_in_use
    else:
        assert pool.peak_in_use["shard"] == len(eng.buckets), pool.peak_in_use  # every shard held until step()
    free = sum(t.numel() * t.element_size() for ts in pool.free.values() for t in ts)
    assert free == held[-1] and not any(pool.in_use.values()), (free, held)  # all back between steps
    return held


def hf_save_roundtrip(rank, world_size, path):
    """save_pretrained (safetensors) and torch.save of a model whose params are views of bucket buffers."""
    from transformers import LlamaForCausalLM

    model = tiny_llama()
    opt = ShardedAdamW(model.parameters(), lr=1e-2, bucket_size=2000)
    _train(model, opt, rank, 2)
    _bound(opt)
    if rank == 0:
        model.save_pretrained(path)
        back = LlamaForCausalLM.from_pretrained(path)
        for (n, p), (_, q) in zip(model.state_dict().items(), back.state_dict().items()):
            assert torch.equal(p, q), n
        f = os.path.join(path, "sd.pt")
        torch.save(model.state_dict(), f)
        loaded = torch.load(f, weights_only=True)
        for n, p in model.state_dict().items():
            assert torch.equal(loaded[n], p), n
    dist.barrier()
    return True
