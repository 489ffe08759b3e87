"""ShardedAdamW on N real gloo processes (N = 1, 2, 3, 4; 3 gives uneven padding).

Each rank trains on its own micro-batches. The reference is torch.optim.AdamW fed the rank-averaged gradient the
optimizer applied (reassembled from the shards) on its own copy of the params, and that averaged gradient is
itself checked against an independent average of every rank's local gradient. Tolerance (fp32): max|Δ| / max|ref|
per tensor <= 1e-5, params every step and consolidated optimizer state every 10 steps, 50 steps.
"""

import os
import tempfile

import pytest
import torch

import workers
from distributed import run

pytestmark = pytest.mark.dist

TOL = 1e-5


def configs(model):
    steps = 50
    return [
        dict(model=model, stage=1, steps=steps, accum=2),
        dict(model=model, stage=2, steps=steps, accum=2),  # no_sync for the first micro-batch
        dict(model=model, stage=2, steps=steps, accum=2, no_sync=False, max_grad_norm=0.05),  # 2 reduce rounds
    ]


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
@pytest.mark.parametrize("model", ["mlp", "llama"])
def test_matches_torch_adamw(world_size, model):
    cfgs = configs(model)
    if model == "llama":
        for c in cfgs:
            c["bucket_size"] = 2500
    results = run(workers.matrix, world_size, cfgs, timeout=900)
    for cfg, res in zip(cfgs, results[0]):
        label = f"N={world_size} {cfg}"
        assert res["param"] <= TOL, (label, res)
        assert res["state"] <= TOL, (label, res)
        assert res["grad_norm"] <= TOL, (label, res)
        assert res["reduce"] <= TOL, (label, res)
        # optimizer-state bytes: exactly the owned shard of every bucket, fp32 exp_avg + exp_avg_sq
        assert res["state_bytes"] == res["owned"] * 2 * 4, label
        assert all(0 <= pad < world_size for pad in res["padding"]), label
        assert sum(res["bucket_padded"]) - res["trainable"] == sum(res["padding"]), label
    # across ranks: the shards partition every bucket
    for i in range(len(cfgs)):
        assert sum(r[i]["owned"] for r in results) == sum(results[0][i]["bucket_padded"])
    if world_size > 1 and model == "llama":
        # stage 2 never holds all full-size gradients at once: at most a few buckets in flight
        stage2 = results[0][1]
        assert stage2["peak_full_bytes"] < stage2["grad_bytes"] / 2, stage2


@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("stage", [1, 2])
def test_nan_on_one_rank_skips_everywhere(world_size, stage):
    assert all(run(workers.nan_skip, world_size, stage))


def test_ddp_with_stage1_grads_reduced():
    worst = run(workers.ddp_stage1, 2)
    assert max(worst) <= 1e-6


def test_stage2_under_ddp_is_refused():
    assert all(run(workers.ddp_stage2_is_refused, 2))


@pytest.mark.parametrize("world_size,rs", [(2, "auto"), (4, "auto"), (2, "native")])
def test_stage2_moves_what_ddp_moves(world_size, rs):
    # auto: gloo's point-to-point reduce-scatter and all-gather; native: gloo's own collectives
    res = run(workers.comm_bytes, world_size, 2, env={"ZEROADAMW_GLOO_REDUCE_SCATTER": rs,
                                                      "ZEROADAMW_GLOO_ALL_GATHER": rs})[0]
    # reduce-scatter + all-gather == DDP's all-reduce, up to padding (< N elements per bucket)
    assert res["rs"] + res["ag"] <= res["ddp"] * (res["padded_bytes"] / res["grad_bytes"]) + 1
    assert res["rs"] + res["ag"] >= res["ddp"] - 1
    assert res["control"] < 0.01 * res["ddp"]


@pytest.mark.parametrize("world_size,stage", [(2, 2), (3, 1), (3, 2)])
def test_bf16_params_fp32_master(world_size, stage):
    worst = run(workers.bf16_master, world_size, stage)
    assert max(worst) <= TOL


@pytest.mark.parametrize("stage", [1, 2])
def test_grad_scaler_backs_off_on_every_rank(stage):
    scales = run(workers.grad_scaler_overflow_on_one_rank, 2, stage)
    assert scales[0] == scales[1]
    assert scales[0][3] == scales[0][2] / 2  # backed off at the overflow step


@pytest.mark.parametrize("save_n,load_n", [(2, 3), (3, 1), (1, 4)])
def test_consolidated_state_dict_loads_at_another_world_size(save_n, load_n):
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "ckpt.pt")
        run(workers.save_consolidated, save_n, path, 5)
        results = run(workers.load_consolidated, load_n, path, 5)
    for param_err, state_err in results:
        assert param_err <= TOL and state_err <= TOL


def test_ranks_with_different_layouts_are_refused():
    assert all(run(workers.layout_mismatch, 2))


@pytest.mark.parametrize("stage", [1, 2])
def test_rank_dependent_graph_does_not_hang(stage):
    assert all(run(workers.rank_dependent_graph, 3, stage, timeout=120))


@pytest.mark.parametrize("model", ["mlp", "llama"])
def test_n_ranks_vs_one_process_on_the_whole_batch(model):
    """The only difference between N ranks and one process on the concatenated batch is the order in which
    floating-point sums are taken. Measured over 20 steps at lr 1e-3 (free-running, so differences can grow):
    1.3e-7 / 1.8e-7 (MLP, N = 2 / 4) and 3.8e-7 / 4.4e-7 (tiny Llama) relative; asserted with 2-5x margin."""
    one = run(workers.free_running, 1, model, 20, 4)[0]
    for n in (2, 4):
        many = run(workers.free_running, n, model, 20, 4)[0]
        worst = max(workers.rel_err(a, b) for a, b in zip(many, one))
        print(f"{model} N={n}: max rel diff vs one process {worst:.2e}")
        assert worst <= (1e-6 if model == "mlp" else 2e-6), worst


def test_gradient_arriving_twice_is_an_agreed_error():
    msgs = run(workers.reentrant_double_landing, 2, timeout=120)
    assert all("use_reentrant=False" in m for m in msgs)


@pytest.mark.parametrize("stage", [1, 2])
def test_bad_gradient_on_one_rank_raises_on_every_rank(stage):
    assert all(run(workers.bad_grad_on_one_rank, 2, stage, timeout=120))


def test_grad_scaler_hidden_behind_a_wrapper_is_refused_clearly():
    assert all(run(workers.hidden_grad_scaler_refused, 2, timeout=120))


def test_a_bucket_that_does_not_fill_moves_to_the_end():
    peaks, grad_bytes = run(workers.sometimes_unused_param, 2, timeout=300)[0]
    # step 1 (gate unused) holds everything behind the gate's bucket; from step 3 on the gate's bucket launches last
    assert max(peaks[3:]) < grad_bytes / 2, (peaks, grad_bytes)


def test_a_backward_that_raised_does_not_corrupt_the_next_steps():
    worst = run(workers.backward_fails_midway, 2, timeout=120)
    assert max(worst) <= 1e-6


def test_different_group_counts_are_refused_not_hung():
    assert all(run(workers.group_count_mismatch, 2, timeout=60))
