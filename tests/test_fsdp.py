"""Our optimizers on FSDP2 models (``fully_shard``, 1-D and HSDP meshes): plain optimizers on the DTensor shards.

FSDP2 already shards the params, gradients and (through them) the state, so ShardedAdamW / SparseAdamW /
zeroadamw.AdamW must not shard again: each runs the plain AdamW step on its local shards, equal to
torch.optim.AdamW on the same model. Real gloo processes, real fully_shard."""

from __future__ import annotations

import tempfile

import pytest

import fsdp_workers as W
from distributed import run

pytestmark = pytest.mark.dist

SPECS = [("ShardedAdamW", {"lr": 1e-2, "weight_decay": 0.1}), ("SparseAdamW", {"lr": 1e-2}),
         ("AdamW", {"lr": 1e-2}), ("ShardedAdamW", {"lr": 1e-2, "decay": "l2", "weight_decay": 0.1}),
         ("ShardedAdamW", {"lr": 1e-2, "max_grad_norm": 0.05})]


@pytest.mark.parametrize("mesh", [(2,), (2, 2)], ids=["1d", "hsdp"])
def test_equals_torch_adamw_on_fsdp2(mesh):
    n = 1
    for d in mesh:
        n *= d
    for per_rank in run(W.fsdp_vs_torch, n, mesh, SPECS, timeout=400):
        for (name, kw), r in zip(SPECS, per_rank):
            assert r["param"] <= 1e-6 and r["state"] <= 1e-6, (name, kw, r)
            assert r["dtensor_state"], (name, "state is held as DTensors, as torch's is under FSDP2")
            assert r["state_bytes"] == 8 * r["local_numel"], (name, r)  # fp32 moments of the local shards only
            if name != "AdamW":
                assert r["norm"] <= 1e-6, (name, r)  # grad_norm over every rank's shards


def test_precision_aware_state_on_fsdp2():
    specs = [("AdamW", {"state_dtype": "int8"}), ("ShardedAdamW", {"master_dtype": None, "kahan_sum": True}),
             ("ShardedAdamW", {"master_dtype": None, "kahan_sum": True, "state_dtype": "int8"}),
             ("SparseAdamW", {"master_dtype": None, "kahan_sum": True, "state_dtype": "bf16"})]
    for per_rank in run(W.fsdp_precision, 2, (2,), specs, timeout=400):
        int8, kahan, both, bf16 = per_rank
        assert int8["err"] == 0.0 and kahan["err"] == 0.0 and both["err"] == 0.0, per_rank
        assert bf16["err"] <= 2e-2, bf16  # stochastic rounding by local element index: close, not equal
        assert "exp_avg:uint8" in int8["kinds"] and "kahan_comp:bfloat16" in kahan["kinds"]
        assert "exp_avg:bfloat16" in bf16["kinds"] and "kahan_comp:bfloat16" in bf16["kinds"]
        # bytes of the local shards: Kahan = fp32 moments + a bf16 compensation (10 B/param); int8 + Kahan ~ 4 B
        assert kahan["state_bytes"] == 10 * kahan["local_numel"]
        assert bf16["state_bytes"] == 6 * bf16["local_numel"]
        assert both["state_bytes"] < 4.2 * both["local_numel"]


def test_refusals_and_nonfinite_skip_on_fsdp2():
    for r in run(W.fsdp_refusals, 2, timeout=300):
        mesh, sib, rule, scaler = r["msgs"]
        assert "FSDP2 already shards" in mesh and "drop process_group= / device_mesh=" in mesh
        assert "step_in_backward=False" in sib
        assert "rule='adamw'" in rule
        assert "GradScaler" in scaler and "bf16" in scaler
        # a NaN in one rank's local shard: every rank skips, nothing changes
        assert r["skipped"] and r["unchanged"] and r["skips"] == 1, r
        assert r["dcp"], "torch's get/set_optimizer_state_dict round trip"


def _cmp(a, b):
    worst = 0.0
    assert a["params"].keys() == b["params"].keys()
    for n in a["params"]:
        worst = max(worst, ((a["params"][n] - b["params"][n]).abs().max() / b["params"][n].abs().max()).item())
    assert a["state"].keys() == b["state"].keys()
    for n in a["state"]:
        for k in b["state"][n]:
            x, y = a["state"][n][k], b["state"][n][k]
            worst = max(worst, abs(x - y) if k == "step" else ((x - y).abs().max() / y.abs().max()).item())
    return worst


@pytest.mark.slow
def test_checkpoint_from_fsdp2_reshards_anywhere():
    """zeroadamw.checkpoint of an FSDP2 (2 x 2 HSDP) model + zeroadamw.AdamW loads exactly into FSDP2 over a 1-D
    mesh (ShardedAdamW, SparseAdamW), HSDP again, a flat ShardedAdamW over 4 ranks and one process; continuing
    matches the run that never stopped."""
    K, J = 3, 2
    with tempfile.TemporaryDirectory() as root:
        saved = run(W.fsdp_ckpt_save, 4, root, ("fsdp", (2, 2)), "AdamW", K, J)[0]
        for kind, n, name in [(("fsdp", (4,)), 4, "ShardedAdamW"), (("fsdp", (2, 2)), 4, "AdamW"),
                              (("flat", None), 4, "ShardedAdamW"), (("flat", None), 1, "ShardedAdamW"),
                              (("fsdp", (2,)), 2, "SparseAdamW")]:
            r = run(W.fsdp_ckpt_load, n, root, kind, name, K, J, timeout=300)[0]
            assert _cmp(r["loaded"], saved["at_save"]) == 0.0, (kind, name)
            assert _cmp(r["final"], saved["final"]) <= 1e-5, (kind, name)


@pytest.mark.parametrize("name", ["ShardedAdamW", "AdamW", "torch"])
def test_diagnostics_on_fsdp2(name):
    """param / grad / update norms per group over FSDP2's shards (2 x 2 HSDP: replicas counted once) equal the
    norms of the full tensors, on every rank -- for ours and for torch's AdamW."""
    errs = run(W.fsdp_diagnostics, 4, (2, 2), name, timeout=300)
    assert max(errs) <= 1e-6, errs
