"""SparseAdamW: lazy, exact updates for MoE experts and embedding rows."""

import pytest
import torch
from torch import nn

import sparse_workers
from distributed import run
from zeroadamw import ShardedAdamW, SparseAdamW, moe_param_groups

TOL = 1e-5


@pytest.mark.parametrize("cfg", [dict(steps=50), dict(steps=50, catchup=False), dict(steps=30, decay="independent"),
                                 dict(steps=30, dtype="bfloat16")])
def test_one_process_matches_the_per_slice_reference(cfg):
    """50 steps of random routing (experts idle for several steps), a dense-gradient embedding and a COO one:
    the per-slice loop of tests/reference_sparse.py gives the same weights; idle slices never move; the touched
    mask is exactly the union of non-zero rows; per-row step counts match."""
    res = sparse_workers.sparse_vs_reference(0, 1, cfg)
    tol = TOL if cfg.get("dtype", "float32") == "float32" else 1e-2
    assert res["param"] <= tol and res["reduce"] <= 1e-6, res
    assert res["idle_checked"] > 100


def test_all_slices_touched_equals_dense_adamw():
    assert sparse_workers.all_touched_equals_dense(0, 1, 30) <= 1e-6


def test_catchup_decay_equals_dense_decoupled_decay():
    """A row idle for k steps, then touched: with catch-up its weight got exactly the k missed decays (what a
    dense AdamW with zero gradient would have applied), plus this step's; moments stayed lazy (untouched)."""
    lr, wd = 0.05, 0.3
    w = nn.Parameter(torch.ones(3, 2))
    opt = SparseAdamW([{"params": [w], "sparse": "rows"}], lr=lr, weight_decay=wd)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (s + 1))  # a changing lr, decay follows it
    lrs = []
    for step in range(6):
        w.grad = torch.zeros(3, 2)
        if step in (0, 5):
            w.grad[1] = 1.0  # row 1: touched at steps 0 and 5, idle in between
        w.grad[0] = 1.0  # row 0: touched every step
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    decay = 1.0
    for lr_t in lrs:
        decay *= 1 - lr_t * wd
    # row 1's Adam part: two updates of size lr_t * m_hat/(sqrt(v_hat)+eps) with its own step counts 1 and 2
    ref = nn.Parameter(torch.ones(1, 2))
    r = SparseAdamW([{"params": [ref], "sparse": "rows"}], lr=lr, weight_decay=0.0)
    assert opt.state[w]["step"].tolist() == [6.0, 2.0, 0.0]
    assert torch.equal(w[2], torch.ones(2))  # never touched: lazily untouched (not yet decayed)
    opt.apply_pending_decay()
    torch.testing.assert_close(w[2], torch.full((2,), decay), rtol=1e-6, atol=0)  # now exactly dense decay
    del r


def test_bad_input():
    with pytest.raises(ValueError, match="0-d"):
        SparseAdamW([{"params": [nn.Parameter(torch.tensor(1.0))], "sparse": "rows"}])
    with pytest.raises(ValueError, match="sparse="):
        SparseAdamW([{"params": [nn.Parameter(torch.ones(2, 2))], "sparse": "cols"}])
    emb = nn.Embedding(10, 4, sparse=True)
    opt = SparseAdamW([{"params": emb.parameters()}])  # a dense group
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(TypeError, match="sparse gradient"):
        opt.step()
    with pytest.raises(ValueError, match="step_in_backward"):
        SparseAdamW([nn.Parameter(torch.ones(2))], step_in_backward=True)


def test_a_coo_gradient_sparse_in_two_dims_is_a_clear_error_and_changes_nothing():
    w = nn.Parameter(torch.zeros(4, 3))
    opt = SparseAdamW([{"params": [w], "sparse": "rows"}], lr=0.1)
    w.grad = torch.sparse_coo_tensor(torch.tensor([[0, 1], [0, 2]]), torch.ones(2), (4, 3), check_invariants=True)
    with pytest.raises(ValueError, match="along dim 0 only"):
        opt.step()
    assert w.abs().sum() == 0 and not opt.state[w]["step"].any()


def test_moe_param_groups_for_hf_models():
    from transformers import MixtralConfig, MixtralForCausalLM, Qwen2MoeConfig, Qwen2MoeForCausalLM

    mix = MixtralForCausalLM(MixtralConfig(vocab_size=50, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                           num_attention_heads=2, num_key_value_heads=1, num_local_experts=4,
                                           num_experts_per_tok=2))
    groups, names = moe_param_groups(mix, weight_decay=0.1)
    assert names["experts_rows"] == [f"model.layers.{i}.mlp.experts.{k}" for i in range(2)
                                     for k in ("gate_up_proj", "down_proj")]
    assert names["embeddings"] == ["model.embed_tokens.weight"]
    assert "model.layers.0.mlp.gate.weight" in names["decay"] and "lm_head.weight" in names["decay"]
    assert all(".norm" in n or "layernorm" in n for n in names["no_decay"])
    total = sum(len(v) for v in names.values())
    assert total == len(list(mix.parameters()))
    SparseAdamW(groups, lr=1e-3)  # builds
    qwen = Qwen2MoeForCausalLM(Qwen2MoeConfig(vocab_size=50, hidden_size=16, intermediate_size=24,
                                              moe_intermediate_size=8, shared_expert_intermediate_size=12,
                                              num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                              num_experts=4, num_experts_per_tok=2))
    _, qn = moe_param_groups(qwen)
    assert "model.layers.0.mlp.shared_expert.gate_proj.weight" in qn["decay"]
    assert "model.layers.0.self_attn.q_proj.bias" in qn["no_decay"]
    assert len(qn["experts_rows"]) == 2


@pytest.mark.dist
@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("cfg", [dict(steps=50), dict(steps=30, catchup=False), dict(steps=30, dtype="bfloat16")])
def test_n_ranks_match_the_per_slice_reference(world_size, cfg):
    res = run(sparse_workers.sparse_vs_reference, world_size, cfg, timeout=600)
    # bf16: the probe averages bf16 gradients in bf16, the optimizer reduces them in fp32: bf16 rounding apart
    tol = TOL if cfg.get("dtype", "float32") == "float32" else 1e-2
    for r in res:
        assert r["param"] <= tol and r["reduce"] <= tol, r


@pytest.mark.dist
def test_a_row_whose_entries_cancel_is_still_updated():
    assert all(run(sparse_workers.cancelling_row, 2, timeout=120))


@pytest.mark.dist
def test_expert_groups_count_every_expert_once():
    norms = run(sparse_workers.expert_groups, 4, timeout=300)
    for rank_norms in norms:
        for got, expect in rank_norms:
            assert got == pytest.approx(expect, rel=1e-5)


@pytest.mark.dist
def test_mixtral_with_idle_experts_two_ranks():
    idle = run(sparse_workers.mixtral_idle_experts, 2, 12, timeout=600)
    assert idle[0] > 0  # rank 0 really left experts without tokens


@pytest.mark.dist
def test_process_group_without_this_rank_is_refused():
    assert run(sparse_workers.group_without_this_rank, 2, timeout=60) == ["member", "refused"]


@pytest.mark.dist
@pytest.mark.parametrize("world_size", [1, 2])
def test_coo_gradients_never_materialise_a_dense_gradient(world_size):
    for peak, dense in run(sparse_workers.coo_memory, world_size, timeout=120):
        assert peak < dense / 50, (peak, dense)  # 8 rows of 4096 (x N ranks gathered): far below the table


@pytest.mark.dist
def test_sparse_state_checkpoints_and_reshards(tmp_path):
    """Per-row step counts, decay marks and the groups' cumulative log-decay survive zeroadamw.checkpoint, at the
    same and at another world size (row-sharded state is resharded by rows)."""
    saved = run(sparse_workers.sparse_checkpoint, 2, str(tmp_path), "save", timeout=300)[0]
    same = run(sparse_workers.sparse_checkpoint, 2, str(tmp_path), "load", timeout=300)[0]
    other = run(sparse_workers.sparse_checkpoint, 1, str(tmp_path), "load", timeout=300)[0]
    for res in (same, other):
        assert set(res["state"]["state"]) == set(saved["state"]["state"])
        for k, st in saved["state"]["state"].items():
            for name, t in st.items():
                assert torch.equal(res["state"]["state"][k][name], t), (k, name)
        assert res["state"]["param_groups"] == saved["state"]["param_groups"]
    for a, b in zip(same["params"], saved["params"]):
        assert torch.equal(a, b)  # same N: the continuation is bit-exact
