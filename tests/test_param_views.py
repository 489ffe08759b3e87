"""Params as views of flat bucket buffers (the all-gather writes them in place), the all-gather left in flight
for the next forward (``overlap_param_gather``), and the pooled gradient buffers -- each against the same run
without it, across the crossings users meet (p.data replaced, load_state_dict, a rebuilt optimizer, a dtype
change, evaluation, state_dict, save_pretrained, step in backward)."""

import tempfile

import pytest
import torch

import views_workers
from distributed import run
from zeroadamw.buckets import BufferPool


@pytest.mark.parametrize("world_size,dtype", [(2, "float32"), (3, "bfloat16")])
def test_params_as_views_match_the_copy_out_path(world_size, dtype):
    msgs = run(views_workers.views_crossings, world_size, dtype)
    assert all("float64" in m for m in msgs), msgs


def test_fused_step_in_backward_rebinds_and_bumps_versions():
    assert all(run(views_workers.sib_rebind_and_versions, 2))


@pytest.mark.parametrize("world_size,sib", [(2, False), (3, True)])
def test_deferred_all_gather_is_waited_by_the_next_forward(world_size, sib):
    run(views_workers.deferred_gather, world_size, sib)


@pytest.mark.parametrize("sib", [False, True])
def test_gradient_buffers_are_pooled_and_steady(sib):
    run(views_workers.pool_is_steady, 2, sib)


def test_save_pretrained_and_torch_save_with_views():
    with tempfile.TemporaryDirectory() as d:
        assert all(run(views_workers.hf_save_roundtrip, 2, d))


def test_buffer_pool_reuses_the_smallest_fit_and_ignores_foreign_tensors():
    pool = BufferPool()
    a = pool.take(100, torch.float32, torch.device("cpu"))
    b = pool.take(10, torch.float32, torch.device("cpu"))
    assert pool.bytes == 440
    pool.give(a)
    pool.give(b)
    pool.give(torch.empty(1000))  # not the pool's: left to the allocator
    c = pool.take(8, torch.float32, torch.device("cpu"))
    assert c.numel() == 8 and c.data_ptr() == b.data_ptr()  # the smallest buffer that fits
    d = pool.take(50, torch.float32, torch.device("cpu"))
    assert d.data_ptr() == a.data_ptr() and pool.bytes == 440
    e = pool.take(50, torch.float32, torch.device("cpu"))  # none free: a new one
    assert pool.bytes == 640 and e.data_ptr() not in (a.data_ptr(), b.data_ptr())
    pool.give(c)
    pool.give(c)  # twice: still one entry
    assert sum(len(v) for v in pool.free.values()) == 1
    pool.clear()
    assert pool.bytes == 600 and not any(pool.free.values())  # the free 10-element buffer dropped; the ones in use stay counted


def test_one_process_leaves_params_alone_and_options_are_checked():
    from zeroadamw import ShardedAdamW

    model = torch.nn.Linear(4, 3)
    before = [p.untyped_storage().data_ptr() for p in model.parameters()]
    opt = ShardedAdamW(model.parameters())
    assert all(b.flat is None for b in opt.engine.buckets)  # nothing to gather: params stay the user's tensors
    assert [p.untyped_storage().data_ptr() for p in model.parameters()] == before
    opt.wait_params()  # nothing in flight: a no-op
    with pytest.raises(ValueError, match="needs param_views=True"):
        ShardedAdamW(model.parameters(), overlap_param_gather=True, param_views=False)
    with pytest.raises(TypeError, match="param_views must be True or False"):
        ShardedAdamW(model.parameters(), param_views=1)
    with pytest.raises(TypeError, match="overlap_param_gather must be True or False"):
        ShardedAdamW(model.parameters(), overlap_param_gather="yes")
