"""Hierarchical sharding over a 2-D DeviceMesh ("replicate", "shard"): 4 real gloo processes as 2 x 2, 1 x 4, 4 x 1.

Each run trains with ShardedAdamW over the mesh and, in lockstep, torch.optim.AdamW on the rank-averaged gradient
of every rank's batch; params, state, the gradient norm and every rank's identity are checked, and the counted
bytes per mesh dimension are compared with the communication model (zeroadamw.estimate.comm_bytes)."""

from __future__ import annotations

import tempfile

import pytest
import torch

import mesh_workers as W
from distributed import run
from test_checkpoint import assert_state_equal
from zeroadamw import estimate

pytestmark = pytest.mark.dist


def _train(shape, **cfg):
    cfg = {"model": "mlp", "mesh": shape, "steps": 20, "stage": 2, **cfg}
    return run(W.mesh_vs_reference, 4, cfg)


def _check_exact_bytes(res, shape):
    """The counters of one steady-state step equal the communication model's bytes, dimension by dimension."""
    R, S = shape
    for r in res:
        model = estimate.comm_bytes(r["buckets"], shard=S, replicate=R)
        counted = {dim: {op: v["bytes"] for op, v in ops.items()} for dim, ops in r["counters"].items()
                   if dim != "world"}
        assert {d: ops for d, ops in counted.items() if ops} == {d: ops for d, ops in model.items() if ops}
        assert set(r["counters"]["world"]) <= {"control"}  # the agreement: one small all-reduce over all ranks


@pytest.mark.parametrize("shape", [(2, 2), (1, 4), (4, 1)])
def test_mesh_stage2_equals_torch_adamw(shape):
    res = _train(shape)
    R, S = shape
    for r in res:
        assert r["param"] <= 1e-5 and r["state"] <= 1e-5 and r["grad_norm"] <= 1e-5, r
    # state per rank = AdamW's (8 bytes per trainable element) / S, plus the shard padding
    adamw = 8 * res[0]["trainable"]
    padded = sum(p for p, _, _ in res[0]["buckets"])
    assert all(r["state_bytes"] == 8 * padded // S for r in res)
    assert adamw / S <= res[0]["state_bytes"] <= adamw / S + 8 * len(res[0]["buckets"]) * S
    _check_exact_bytes(res, shape)


def test_mesh_stage1_clipping_and_accumulation():
    res = _train((2, 2), stage=1, max_grad_norm=0.5, accum=2, steps=12)
    assert all(r["param"] <= 1e-5 and r["state"] <= 1e-5 and r["grad_norm"] <= 1e-5 for r in res), res


@pytest.mark.parametrize("clip", [None, 0.5])
def test_mesh_step_in_backward(clip):
    res = _train((2, 2), model="llama", step_in_backward=True, max_grad_norm=clip, steps=8, bucket_size=2000)
    assert all(r["param"] <= 1e-5 and r["state"] <= 1e-5 for r in res), res
    _check_exact_bytes(res, (2, 2))


def test_mesh_int8_state():
    """Precision-aware state over the mesh: int8 moments, blocks cut inside a node's shard group."""
    res = _train((2, 2), model="llama", state_dtype="int8", steps=6, bucket_size=5000)
    assert all(r["param"] <= 2e-2 for r in res), res  # int8 moments: close to, not equal to, fp32 AdamW


def test_sparse_adamw_over_mesh_equals_flat():
    for shape in ((2, 2), (4, 1)):
        errs = run(W.sparse_mesh_vs_flat, 4, shape, 6, timeout=400)
        assert max(errs) <= 1e-10, (shape, errs)


def test_bad_meshes_are_refused():
    msgs = run(W.bad_mesh, 4)[0]
    assert "mesh_dim_names=('replicate', 'shard')" in msgs[0] and msgs[0].startswith("ValueError")
    assert "either process_group= or device_mesh=" in msgs[1]
    assert msgs[2].startswith("TypeError") and "DeviceMesh" in msgs[2]


@pytest.mark.slow
def test_checkpoint_matrix_across_mesh_shapes():
    """Saved over 2 x 2 and over a flat group of 4; loaded over 1 x 4, 4 x 1, flat 4, one process and 2 x 2:
    params and the consolidated optimizer state equal the saved ones exactly; continuing matches the run that
    never stopped (bit for bit on the same layout)."""
    K, J = 3, 2
    with tempfile.TemporaryDirectory() as root:
        saved = {"2x2": run(W.mesh_ckpt_save, 4, root, (2, 2), K, J)[0],
                 "flat4": run(W.mesh_ckpt_save, 4, root, None, K, J)[0]}
        for shape, n in [((1, 4), 4), ((4, 1), 4), (None, 4), ((1, 1), 1), ((2, 2), 4)]:
            res = run(W.mesh_ckpt_load, n, root, shape, list(saved), K, J)[0]
            for src, r in res.items():
                ref = saved[src]
                assert all(torch.equal(p, q) for p, q in zip(r["loaded"]["params"], ref["at_save"]["params"]))
                assert_state_equal(r["loaded"]["optim"], ref["at_save"]["optim"])
                for p, q in zip(r["final"]["params"], ref["final"]["params"]):
                    if src == _same(shape, n):
                        assert torch.equal(p, q), (shape, src)
                    else:
                        assert (p - q).abs().max() <= 1e-5 * q.abs().max(), (shape, src)


def _same(shape, n):
    return W._name(shape, n)
