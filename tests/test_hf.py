"""HF Trainer with zeroadamw: real transformers / accelerate / peft, real processes (gloo)."""

import os
import tempfile

import pytest
import torch

import hf_workers
from distributed import run
from helpers import rel_err

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


def params_close(a, b, tol):
    worst = max(rel_err(a[k], b[k]) for k in a)
    assert worst <= tol, worst
    return worst


def test_grad_norm_and_updates_match_a_plain_trainer(tmp_path):
    """One process: ZeroTrainer logs the same pre-clip grad_norm as Trainer(optim="adamw_torch") with
    clip_grad_norm_, and ends with the same weights."""
    ours = hf_workers.make_trainer(str(tmp_path / "z"), 1, 4, {"stage": 2}, max_steps=4)
    ours.train()
    ref = hf_workers.make_trainer(str(tmp_path / "t"), 1, 4, None, max_steps=4, plain=True)
    ref.train()
    g1 = [h["grad_norm"] for h in ours.state.log_history if "grad_norm" in h]
    g2 = [h["grad_norm"] for h in ref.state.log_history if "grad_norm" in h]
    assert len(g1) == len(g2) == 4
    for a, b in zip(g1, g2):
        assert a == pytest.approx(b, rel=1e-5)
    from zeroadamw import ShardedAdamW

    assert isinstance(ours.optimizer.optimizer, ShardedAdamW) and not isinstance(ref.optimizer.optimizer, ShardedAdamW)
    pa = {n: p for n, p in ours.model.named_parameters()}
    pb = {n: p for n, p in ref.model.named_parameters()}
    params_close(pa, pb, 1e-5)


def test_accumulation_equals_the_bigger_batch(tmp_path):
    a = hf_workers.train_run(0, 1, str(tmp_path / "a"), 2, {"stage": 2}, max_steps=3, accum=2)
    b = hf_workers.train_run(0, 1, str(tmp_path / "b"), 4, {"stage": 2}, max_steps=3, accum=1)
    params_close(a["params"], b["params"], 1e-5)


@pytest.mark.dist
@pytest.mark.slow
def test_stage2_trainer_resumes_at_the_same_and_another_world_size():
    """2 ranks: an uninterrupted 8-step run; a run checkpointed at step 4; resuming it at N=2 is bit-exact, at
    N=1 (same global batch) equal to rounding. The model is not DDP-wrapped and the optimizer's traffic is exactly
    reduce-scatter + all-gather of the (padded) gradients, once per step."""
    zero = {"stage": 2, "bucket_size": 3000}
    with tempfile.TemporaryDirectory() as root:
        first = run(hf_workers.scenarios, 2, root, [
            ("full", dict(per_device=4, zero_kwargs=zero, max_steps=8)),
            ("saved", dict(per_device=4, zero_kwargs=zero, max_steps=8, save_steps=4)),
        ], init=False, timeout=900)
        ckpt = os.path.join(root, "saved", "checkpoint-4")
        assert os.path.isdir(os.path.join(ckpt, "zeroadamw_optimizer"))
        same_n = run(hf_workers.scenarios, 2, root, [
            ("resumed", dict(dir="saved", per_device=4, zero_kwargs=zero, max_steps=8, resume=ckpt)),
        ], init=False, timeout=600)
        one = run(hf_workers.scenarios, 1, root, [
            ("resumed1", dict(dir="saved", per_device=8, zero_kwargs=zero, max_steps=8, resume=ckpt)),
        ], init=False, timeout=600)
    full = first[0]["full"]
    assert full["model_type"] == "LlamaForCausalLM", "Trainer wrapped the model in DDP"
    c = full["comm"]
    assert "all_reduce" not in c, c  # no gradient all-reduce at all (gloo: the point-to-point reduce-scatter)
    steps = 8
    expect = (2 - 1) / 2 * full["padded"] * 4 * steps
    assert c["reduce_scatter"]["bytes"] == pytest.approx(expect, rel=1e-6)
    assert c["all_gather"]["bytes"] == pytest.approx(expect, rel=1e-6)
    for k, v in same_n[0]["resumed"]["params"].items():
        assert torch.equal(v, full["params"][k]), k
    params_close(one[0]["resumed1"]["params"], full["params"], 1e-5)
    assert full["state_bytes"] == full["padded"] // 2 * 8


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.parametrize("variant", ["stage1", "step_in_backward", "lora"])
def test_trainer_variants_resume_exactly(variant):
    kw = dict(per_device=4, max_steps=6)
    if variant == "stage1":
        kw["zero_kwargs"] = {"stage": 1, "bucket_size": 3000}
    elif variant == "step_in_backward":
        kw.update(zero_kwargs={"stage": 2, "step_in_backward": True, "bucket_size": 3000}, max_grad_norm=0.0)
    else:
        kw.update(zero_kwargs={"stage": 2}, lora=True)
    with tempfile.TemporaryDirectory() as root:
        res = run(hf_workers.scenarios, 2, root, [
            ("full", dict(kw)),
            ("saved", dict(kw, save_steps=3)),
            ("resumed", dict(kw, dir="saved", resume=os.path.join(root, "saved", "checkpoint-3"))),
        ], init=False, timeout=900)
    full, resumed = res[0]["full"], res[0]["resumed"]
    assert full["model_type"] != "DistributedDataParallel"
    for k, v in resumed["params"].items():
        assert torch.equal(v, full["params"][k]), (variant, k)
    assert len(full["grad_norms"]) == 6 and all(g > 0 for g in full["grad_norms"])
    if variant == "lora":
        # only the adapters are trainable, sharded over 2 ranks: state = their padded elements / 2 x 8 bytes
        assert full["trainable"] < 5000
        assert full["state_bytes"] == full["padded"] // 2 * 8


def test_trl_sft_trainer_with_the_mixin(tmp_path):
    """TRL's SFTTrainer takes the same arguments: the mixin gives it ShardedAdamW and the optimizer's grad_norm."""
    from datasets import Dataset
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from trl import SFTConfig, SFTTrainer

    from helpers import tiny_llama
    from zeroadamw.integrations.accelerate import find_sharded_optimizer
    from zeroadamw.integrations.hf import ZeroTrainerMixin

    class ZeroSFTTrainer(ZeroTrainerMixin, SFTTrainer):
        pass

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(97)}, unk_token="t96"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="t96", eos_token="t96")
    g = torch.Generator().manual_seed(0)
    ds = Dataset.from_dict({"input_ids": torch.randint(0, 96, (32, 12), generator=g).tolist()})
    args = SFTConfig(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, report_to=[],
                     use_cpu=True, logging_steps=1, learning_rate=1e-3, max_grad_norm=1.0, disable_tqdm=True,
                     dataset_kwargs={"skip_prepare_dataset": True}, save_strategy="no")
    trainer = ZeroSFTTrainer(model=tiny_llama(), args=args, train_dataset=ds, processing_class=tokenizer,
                             zeroadamw={"stage": 2})
    trainer.train()
    opt = find_sharded_optimizer(trainer.optimizer)
    assert opt is not None and opt.max_grad_norm == 1.0
    norms = [h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h]
    assert len(norms) == 3 and norms[-1] == pytest.approx(opt.grad_norm)


def test_trainer_gives_moe_models_sparse_adamw(tmp_path):
    """A Mixtral under ZeroTrainer: SparseAdamW with the expert / embedding row groups, and it trains."""
    from transformers import MixtralConfig, MixtralForCausalLM, TrainingArguments

    from zeroadamw import SparseAdamW
    from zeroadamw.integrations.accelerate import find_sharded_optimizer
    from zeroadamw.integrations.hf import ZeroTrainer

    torch.manual_seed(0)
    model = MixtralForCausalLM(MixtralConfig(vocab_size=97, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                             num_attention_heads=2, num_key_value_heads=1, num_local_experts=4,
                                             num_experts_per_tok=2, max_position_embeddings=32))
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=2, report_to=[],
                             use_cpu=True, logging_steps=1, save_strategy="no", disable_tqdm=True)
    trainer = ZeroTrainer(model=model, args=args, train_dataset=hf_workers.TokenDataset(16), zeroadamw={})
    trainer.train()
    opt = find_sharded_optimizer(trainer.optimizer)
    assert isinstance(opt, SparseAdamW)
    assert trainer.zeroadamw_group_names["experts_rows"][0] == "model.layers.0.mlp.experts.gate_up_proj"
    assert len([h for h in trainer.state.log_history if "grad_norm" in h]) == 3
