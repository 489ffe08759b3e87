"""zeroadamw doctor's structure: the table of finding kinds, and each check on its own (context in -> findings out)."""

from __future__ import annotations

import dataclasses
import random
import re
import string

import pytest
from test_doctor import SANE_FLAGS, SANE_HF, TINY_LLAMA, TRIGGERS, with_

import zeroadamw.doctor as doctor
from zeroadamw.doctor import CHECKS, CODES, FINDINGS, SEVERITIES, build_context, summarize


def ctx_of(cfg, model=None):
    return build_context(cfg, model, use_transformers=False)


def fuzz_configs(n=400, seed=0):
    """Sane configs with a few keys changed at random: reaches every check and most of their branches."""
    options = dict(
        weight_decay=[0.0, 1e-6, 5e-5, 0.1, 1.0, 50.0], learning_rate=[1e-5, 1e-4, 1e-2, 0.0],
        adam_beta2=[0.95, 0.999, 0.99999, 1.0], max_steps=[None, 100, 2000], steps_per_epoch=[None, 100, 20000],
        warmup_steps=[0, 0.3, 100, 70000], lr_scheduler_type=[None, "constant", "cosine", "weird"],
        optim=[None, "adamw_torch_fused", "lomo", "adalomo", "sgd", "rmsprop", "zeroadamw"],
        decay=[None, "l2", "independent", "bogus"], rule=[None, "lomo", "adalomo"], step_in_backward=[None, True],
        max_grad_norm=[None, 0.0, 1.0], fp16=[None, True], gradient_accumulation_steps=[None, 1, 4],
        grads_reduced=[None, True], stage=[None, 1, 2], resume_from_checkpoint=[None, True],
        load_optimizer=[None, False], ignore_data_skip=[None, True], save_only_model=[None, True],
        lr_max=[None, 1e-3], no_decay_groups=[None, True, False], decay_embeddings=[None, False],
        num_train_epochs=[None, 0.5, 3], state_dtype=[None, "int8", "bf16", "int4"], master_dtype=[None, "none"],
        kahan_sum=[None, True], param_dtype=[None, "bf16", "fp32"], world_size=[None, 4], lora_r=[None, 4])
    rng = random.Random(seed)
    out = [c for cases in TRIGGERS.values() for c, _ in cases]
    for _ in range(n):
        cfg = dict(rng.choice([SANE_HF, SANE_FLAGS, {"output_dir": "x"}]))
        for k in rng.sample(sorted(options), rng.randint(1, 6)):
            v = rng.choice(options[k])
            if v is None:
                cfg.pop(k, None)
            else:
                cfg[k] = v
        out.append(cfg)
    return out


FUZZ = fuzz_configs()


# ------------------------------------------------------------------------------------------------ the table
def _fields(template):
    return {name for _, name, _, _ in string.Formatter().parse(template) if name}


def test_table_entries_are_complete():
    assert FINDINGS and CODES == {code: kind.title for code, kind in FINDINGS.items()}
    for code, kind in FINDINGS.items():
        assert kind.code == code and re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", code), code
        assert kind.severity in SEVERITIES, code
        assert kind.title.strip() and kind.why.strip() and kind.fix.strip(), code
        _fields(kind.why), _fields(kind.fix)  # well-formed templates (a stray brace raises ValueError)
        for name, v in kind.variants.items():
            assert name and (v.severity or v.why or v.fix), (code, name)
            assert v.severity in (None, *SEVERITIES), (code, name)
            for text in (v.why, v.fix):
                assert text is None or (text.strip() and _fields(text) is not None), (code, name)
        for name, note in kind.notes.items():
            assert name and note.strip() and not _fields(note), (code, name)


def test_every_emitted_finding_comes_from_the_table():
    emitted = set()
    for cfg in FUZZ:
        for model in (None, TINY_LLAMA):
            for f in summarize(cfg, model, use_transformers=False)[0]:
                kind = FINDINGS.get(f.code)
                assert kind is not None, f.code
                assert f.severity in kind.severities, (f.code, f.severity)
                assert f.message.strip() and f.why.strip() and f.fix.strip(), f.code
                assert "{" not in f.why and "{" not in f.fix.replace("{'params'", ""), f.to_dict()  # all filled
                # the why is the table's (or one of its variants'), filled in
                whys = [kind.why] + [v.why for v in kind.variants.values() if v.why]
                heads = [re.split(r"\{", w)[0] for w in whys]
                assert any(f.why.startswith(h) for h in heads), (f.code, f.why)
                emitted.add((f.code, f.why[:40]))
    codes = {c for c, _ in emitted}
    assert codes == set(FINDINGS), set(FINDINGS) - codes  # every kind is reachable
    for code, kind in FINDINGS.items():  # and every variant's wording is
        for name, v in kind.variants.items():
            if v.why:
                head = v.why.split("{")[0][:40]
                assert any(c == code and w.startswith(head[:len(w)]) for c, w in emitted), (code, name)


def test_each_check_emits_only_its_own_codes():
    own = {
        doctor.check_invalid_values: {"invalid-value"},
        doctor.check_decay_ignored: {"decay-ignored"},
        doctor.check_l2_with_adam: {"l2-with-adam"},
        doctor.check_timescale: {"tau-too-short", "tau-too-long"},
        doctor.check_tau_undefined: {"tau-undefined"},
        doctor.check_run_length: {"run-length-unknown", "steps-per-epoch-unknown"},
        doctor.check_decay_on_norms_biases: {"decay-on-norms-biases"},
        doctor.check_decay_on_embeddings: {"decay-on-embeddings"},
        doctor.check_warmup_missing: {"warmup-missing"},
        doctor.check_warmup_ignored: {"warmup-ignored"},
        doctor.check_warmup_too_long: {"warmup-too-long"},
        doctor.check_beta2_horizon: {"beta2-too-long-for-run"},
        doctor.check_lomo_accumulation: {"accumulation-unsupported"},
        doctor.check_lomo_clipping: {"clipping-unsupported"},
        doctor.check_fp16_fused_step_in_backward: {"fp16-fused-step-in-backward"},
        doctor.check_fused_accumulation: {"accumulation-needs-no-sync"},
        doctor.check_ddp_with_stage_2: {"ddp-with-stage-2"},
        doctor.check_resume_optimizer_state: {"resume-without-optimizer-state"},
        doctor.check_resume_data_skip: {"resume-data-not-skipped"},
        doctor.check_independent_schedule_peak: {"independent-without-schedule-peak"},
        doctor.check_no_master_no_kahan: {"no-master-no-kahan"},
        doctor.check_int8_small_tensors: {"int8-small-tensors"},
        doctor.check_bnb_8bit_with_sharding: {"bnb-8bit-with-sharding"},
    }
    assert set(own) == set(CHECKS) and len(CHECKS) == len(set(CHECKS))
    assert set().union(*own.values()) == set(FINDINGS)
    for cfg in FUZZ[:150]:
        ctx = ctx_of(cfg)
        for check in CHECKS:
            assert {f.code for f in check(ctx)} <= own[check], (check.__name__, cfg)


def test_docstring_table_matches_findings():
    rows = re.findall(r"^``([a-z0-9-]+)``\s+(info|warn|error)\s", doctor.__doc__, re.M)
    assert {code: sev for code, sev in rows} == {code: k.severity for code, k in FINDINGS.items()}


def test_finding_kind_rejects_bad_severity():
    with pytest.raises(ValueError):
        doctor.FindingKind("x-y", "fatal", "t", "w", "f")
    with pytest.raises(ValueError):
        doctor.FindingKind("x-y", "warn", "t", "w", "f", variants={"v": doctor.Variant("fatal")})


def test_summarize_runs_the_checks_in_order(monkeypatch):
    seen = []

    def spy(name):
        def check(ctx):
            seen.append(name)
            return [doctor.FINDINGS["tau-undefined"].make(name)] if name == "b" else []
        return check

    monkeypatch.setattr(doctor, "CHECKS", [spy("a"), spy("b"), spy("c")])
    findings, summary = summarize(SANE_HF)
    assert seen == ["a", "b", "c"]
    assert [f.message for f in findings] == ["b"] and summary["counts"]["info"] == 1


# ------------------------------------------------------------------------------------------ individual checks
def one(findings, code=None):
    assert len(findings) == 1, [f.to_dict() for f in findings]
    if code:
        assert findings[0].code == code
    return findings[0]


def test_check_invalid_values():
    ctx = ctx_of(SANE_HF)
    assert doctor.check_invalid_values(ctx) == []
    ctx.run.invalid.append(("adam_beta2", "adam_beta2 = 1.0 is outside [0, 1)"))
    f = one(doctor.check_invalid_values(ctx), "invalid-value")
    assert f.severity == "error" and f.data == {"key": "adam_beta2"}
    assert f.message == "adam_beta2 = 1.0 is outside [0, 1)." and f.fix == "Set a valid `adam_beta2`."


def test_check_decay_ignored():
    f = one(doctor.check_decay_ignored(ctx_of(with_(SANE_HF, optim="adalomo"))), "decay-ignored")
    assert "AdaLomo" in f.message and f.data == {"weight_decay": 0.1}
    assert doctor.check_decay_ignored(ctx_of(with_(SANE_HF, optim="adalomo", weight_decay=0.0))) == []
    assert doctor.check_decay_ignored(ctx_of(with_(SANE_FLAGS, rule="adalomo"))) == []  # ours honours it


def test_check_l2_with_adam():
    assert one(doctor.check_l2_with_adam(ctx_of(with_(SANE_FLAGS, decay="l2")))).severity == "warn"
    assert doctor.check_l2_with_adam(ctx_of(with_(SANE_FLAGS, decay="l2", rule="lomo"))) == []  # SGD: no sqrt(v)
    assert doctor.check_l2_with_adam(ctx_of(SANE_FLAGS)) == []


def test_check_timescale_short_long_and_zeroing():
    assert doctor.check_timescale(ctx_of(SANE_HF)) == []
    f = one(doctor.check_timescale(ctx_of(with_(SANE_HF, weight_decay=50.0))), "tau-too-short")
    assert f.severity == "warn" and "shorter than about one epoch (20,000 steps)" in f.message
    assert f.data["tau_steps"] == pytest.approx(200.0) and "forgets most of each epoch" in f.why
    assert f.fix.startswith("Lower weight_decay: weight_decay between 0.167 and 0.5 puts τ between 1 epoch")
    f = one(doctor.check_timescale(ctx_of(with_(SANE_HF, learning_rate=1e-2, weight_decay=200.0))))
    assert f.severity == "error" and "per-step decay factor -1 is ≤ 0" in f.message and "zero" in f.why
    f = one(doctor.check_timescale(ctx_of(with_(SANE_FLAGS, weight_decay=1.0))))  # independent: 1 - λ = 0
    assert f.severity == "error" and "With decay='independent'" in f.fix
    f = one(doctor.check_timescale(ctx_of(with_(SANE_FLAGS, weight_decay=0.1))))
    assert f.severity == "warn" and "(decay='independent': λ is the per-step decay" in f.fix
    single = with_(SANE_HF, drop=("steps_per_epoch", "num_train_epochs"), max_steps=100000, weight_decay=2000.0)
    f = one(doctor.check_timescale(ctx_of(single)))
    assert "under 2% of the 100,000-step run" in f.message and "the last 0.0% of it" in f.why
    # README's example: lr 2e-5, weight_decay 0.01, 3 epochs of 500 steps
    f = one(doctor.check_timescale(ctx_of({"learning_rate": 2e-5, "weight_decay": 0.01, "num_train_epochs": 3,
                                           "steps_per_epoch": 500, "output_dir": "x"})), "tau-too-long")
    assert "τ = 1/(lr·λ) = 5,000,000 steps = 1e+04 epochs" in f.message
    assert f.fix.startswith("Raise weight_decay: weight_decay between 33.3 and 100 puts τ between 1 epoch and the "
                            "whole run")
    assert "exp(-run/τ) = 1.00" in f.why


def test_check_tau_undefined():
    assert one(doctor.check_tau_undefined(ctx_of(with_(SANE_HF, weight_decay=0.0)))).code == "tau-undefined"
    assert doctor.check_tau_undefined(ctx_of(SANE_HF)) == []


def test_check_run_length():
    assert doctor.check_run_length(ctx_of(SANE_HF)) == []
    f = one(doctor.check_run_length(ctx_of(with_(SANE_HF, drop=("steps_per_epoch",)))), "run-length-unknown")
    assert f.message.startswith("τ = 1/(lr·λ) = 100,000 steps; the run length is unknown") and f.data["tau_steps"]
    f = one(doctor.check_run_length(ctx_of(with_(SANE_HF, drop=("steps_per_epoch",), weight_decay=0.0))))
    assert f.code == "run-length-unknown" and f.data == {} and f.why.startswith("Warm-up, β2 and the weight-decay")
    f = one(doctor.check_run_length(ctx_of(with_(SANE_HF, drop=("steps_per_epoch", "num_train_epochs"),
                                                 max_steps=60000))))
    assert f.code == "steps-per-epoch-unknown"


def test_check_decay_groups_with_and_without_model():
    everything = with_(SANE_FLAGS, drop=("no_decay_groups", "decay_embeddings"))
    f = one(doctor.check_decay_on_norms_biases(ctx_of(everything)), "decay-on-norms-biases")
    assert "norm gains (grouping: every parameter decayed; assumed" in f.message
    f = one(doctor.check_decay_on_norms_biases(ctx_of(everything, TINY_LLAMA)))
    assert ": 5 tensors, 160 elements (model.layers.0.input_layernorm.weight" in f.message
    assert f.data["elements"] == 160
    f = one(doctor.check_decay_on_embeddings(ctx_of(everything, dict(TINY_LLAMA, tie_word_embeddings=True))))
    assert "model.embed_tokens.weight (3,104 elements, tied to the output layer)" in f.message
    assert doctor.check_decay_on_norms_biases(ctx_of(SANE_FLAGS, TINY_LLAMA)) == []
    assert doctor.check_decay_on_embeddings(ctx_of(SANE_FLAGS, TINY_LLAMA)) == []
    ctx = ctx_of(with_(everything, weight_decay=0.0), TINY_LLAMA)
    assert ctx.groups is None and doctor.check_decay_on_norms_biases(ctx) == []


def test_check_warmup_missing():
    f = one(doctor.check_warmup_missing(ctx_of(with_(SANE_HF, warmup_steps=0))), "warmup-missing")
    assert f.data == {"suggested_warmup_steps": 2000} and "`warmup_steps: 2000`" in f.fix  # 2/(1-0.999)
    f = one(doctor.check_warmup_missing(ctx_of(with_(SANE_HF, warmup_steps=0, max_steps=5000))))
    assert f.data == {"suggested_warmup_steps": 500}  # at most 10 % of the run
    ctx = ctx_of(with_(SANE_HF, warmup_steps=0, resume_from_checkpoint=True))  # resuming with the state: fine
    assert doctor.check_warmup_missing(ctx) == []
    assert one(doctor.check_warmup_missing(dataclasses.replace(ctx, no_opt_state=True)))
    assert doctor.check_warmup_missing(ctx_of(with_(SANE_FLAGS, warmup_steps=0, rule="lomo"))) == []  # SGD


@pytest.mark.parametrize("beta2,rule,total,expected", [
    (0.999, "adamw", None, 2000), (0.95, "adamw", None, 40), (0.98, "adamw", None, 100), (0.997, "adamw", None, 667),
    (0.999, "adamw", 3000, 300), (0.999, "adalomo", None, 100), (1.0, "adamw", None, 100), (1.0, "adamw", 50, 5),
])
def test_suggested_warmup_steps(beta2, rule, total, expected):
    assert doctor.suggested_warmup_steps(beta2, rule, total) == expected


def test_check_warmup_ignored_and_too_long():
    assert doctor.check_warmup_ignored(ctx_of(SANE_HF)) == []
    f = one(doctor.check_warmup_ignored(ctx_of(with_(SANE_HF, lr_scheduler_type="reduce_lr_on_plateau"))))
    assert f.data == {"scheduler": "reduce_lr_on_plateau"}
    assert doctor.check_warmup_too_long(ctx_of(SANE_HF)) == []
    f = one(doctor.check_warmup_too_long(ctx_of(with_(SANE_HF, warmup_steps=30000))), "warmup-too-long")
    assert f.severity == "warn" and "(50% of the run)" in f.message and "e.g. 3000 steps" in f.fix
    f = one(doctor.check_warmup_too_long(ctx_of(with_(SANE_HF, warmup_steps=60000))))
    assert f.severity == "error" and "never reaches its peak" in f.why


def test_check_beta2_horizon():
    assert doctor.check_beta2_horizon(ctx_of(SANE_HF)) == []
    f = one(doctor.check_beta2_horizon(ctx_of(with_(SANE_HF, drop=("num_train_epochs",), max_steps=2000))))
    assert f.data["horizon_steps"] == pytest.approx(1000) and "(β2 ≈ 0.995)" in f.fix and "50%" in f.message


def test_check_lomo_accumulation_and_clipping():
    ctx = ctx_of(with_(SANE_HF, optim="lomo"))
    f = one(doctor.check_lomo_accumulation(ctx), "accumulation-unsupported")
    assert "4 small steps instead of one" in f.why
    assert one(doctor.check_lomo_clipping(ctx), "clipping-unsupported").data == {"max_grad_norm": 1.0}
    ours = ctx_of(with_(SANE_FLAGS, rule="lomo"))  # ShardedAdamW's lomo rule honours both
    assert doctor.check_lomo_accumulation(ours) == [] and doctor.check_lomo_clipping(ours) == []


def test_check_fused_step_in_backward():
    ctx = ctx_of(with_(SANE_FLAGS, drop=("max_grad_norm",)))
    assert one(doctor.check_fp16_fused_step_in_backward(ctx)).severity == "error"
    assert one(doctor.check_fused_accumulation(ctx)).data == {"gradient_accumulation_steps": 4}
    for quiet in (ctx_of(SANE_FLAGS), dataclasses.replace(ctx, step_in_backward=False)):
        assert doctor.check_fp16_fused_step_in_backward(quiet) == [] and doctor.check_fused_accumulation(quiet) == []
    assert doctor.check_fp16_fused_step_in_backward(dataclasses.replace(ctx, fp16=False)) == []


def test_check_ddp_with_stage_2():
    assert one(doctor.check_ddp_with_stage_2(ctx_of(with_(SANE_FLAGS, grads_reduced=True))))
    stage1 = with_(SANE_FLAGS, grads_reduced=True, stage=1, step_in_backward=False)
    assert doctor.check_ddp_with_stage_2(ctx_of(stage1)) == []


def test_check_resume():
    ctx = ctx_of(with_(SANE_HF, resume_from_checkpoint="ckpt", save_only_model=True, ignore_data_skip=True))
    f = one(doctor.check_resume_optimizer_state(ctx), "resume-without-optimizer-state")
    assert "resume_from_checkpoint = 'ckpt', but the checkpoints are saved with save_only_model" in f.message
    assert one(doctor.check_resume_data_skip(ctx), "resume-data-not-skipped")
    fine = ctx_of(with_(SANE_HF, resume_from_checkpoint="ckpt"))
    assert doctor.check_resume_optimizer_state(fine) == [] and doctor.check_resume_data_skip(fine) == []


def test_check_independent_schedule_peak():
    assert doctor.check_independent_schedule_peak(ctx_of(SANE_FLAGS)) == []
    f = one(doctor.check_independent_schedule_peak(ctx_of(with_(SANE_FLAGS, lr_max=1e-3))))
    assert "peak lr 0.001 differs from the optimizer's lr 0.0003" in f.message and f.data["lr_max"] == 1e-3
    assert doctor.check_independent_schedule_peak(ctx_of(with_(SANE_FLAGS, lr_max=1e-3,
                                                               lr_scheduler_type="one_cycle"))) == []
    f = one(doctor.check_independent_schedule_peak(ctx_of(with_(SANE_FLAGS, lr_scheduler_type="ramp"))))
    assert "'ramp' is unknown" in f.message
    assert doctor.check_independent_schedule_peak(ctx_of(with_(SANE_FLAGS, decay="decoupled", lr_max=1e-3))) == []


def test_context_is_built_once_and_shared():
    ctx = ctx_of(with_(SANE_HF, optim="lomo"))
    assert ctx.hf_lomo and ctx.wd_effective == 0.0 and ctx.tau is None and ctx.groups is None
    ctx = ctx_of(with_(SANE_HF, lr_scheduler_kwargs={"max_lr": 2e-4}))
    assert ctx.lr_peak == 2e-4 and ctx.tau.tau == pytest.approx(1 / (2e-4 * 0.1))
    assert ctx.tau.band == (20000, 60000) and ctx.tau.multi_epoch


# ------------------------------------------------------------------------------------------ state precision
def test_check_no_master_no_kahan():
    bf16 = with_(SANE_FLAGS, master_dtype=None, param_dtype="bf16")
    f = one(doctor.check_no_master_no_kahan(ctx_of(bf16)), "no-master-no-kahan")
    assert f.severity == "warn"
    assert f.message == "master_dtype=None without kahan_sum: bf16 weights are updated in bf16."
    # |w| >= lr / 2**-9: half a bf16 ulp of w is above lr, so an update of lr rounds away
    assert f.data["lost_above"] == pytest.approx(3e-4 * 512) and "above 0.15 in magnitude" in f.why
    assert "(0.20% to 0.39% of it)" in f.why and f.fix.startswith("Set `kahan_sum: true` (with `master_dtype: null`)")
    f = one(doctor.check_no_master_no_kahan(ctx_of(with_(bf16, param_dtype="float16", lr=1e-5))))
    assert f.data["lost_above"] == pytest.approx(1e-5 * 4096) and "fp16 weights are updated in fp16" in f.message
    f = one(doctor.check_no_master_no_kahan(ctx_of(with_(bf16, drop=("param_dtype",)))))
    assert "set `param_dtype`" in f.message and f.data["param_dtype"] is None
    f = one(doctor.check_no_master_no_kahan(ctx_of(with_(bf16, rule="adalomo"))))
    assert "not implemented for adalomo" in f.fix
    for quiet in (with_(bf16, kahan_sum=True), with_(bf16, param_dtype="fp32"), with_(bf16, drop=("master_dtype",)),
                  with_(bf16, master_dtype="fp32"), with_(SANE_HF, torch_dtype="bfloat16", optim="adamw_bnb_8bit"),
                  with_(SANE_HF, optim="adamw_torch_fused"), with_(SANE_HF, bf16=True)):
        assert doctor.check_no_master_no_kahan(ctx_of(quiet)) == [], quiet
    # torch AdamW on a model loaded in bf16 (HF Trainer, TRL's model_init_kwargs): no master copy either
    f = one(doctor.check_no_master_no_kahan(ctx_of(with_(SANE_HF, optim="adamw_torch_fused", torch_dtype="bfloat16"))))
    assert "optim 'adamw_torch_fused' (torch AdamW, no master copy)" in f.message and "`optim: zeroadamw`" in f.fix
    f = one(doctor.check_no_master_no_kahan(ctx_of(with_(SANE_HF, model_init_kwargs={"torch_dtype": "bfloat16"}))))
    assert f.data["param_dtype"] == "bf16"


def test_check_int8_small_tensors():
    int8 = with_(SANE_FLAGS, state_dtype="int8")
    f = one(doctor.check_int8_small_tensors(ctx_of(int8, TINY_LLAMA)), "int8-small-tensors")
    assert f.data == {"fp32_fraction": 1.0, "small_tensors": 21, "tensors": 21, "elements": 21728,
                      "moment_bytes_per_element": 8.0}
    assert "(full fine-tune): 21 of 21 trainable tensors, 100% of the 21,728" in f.message and "8.00 B" in f.fix
    # one layer, h = 64: q / o (4096) quantized, k / v / MLP (2048, 3072), norms and embeddings not
    mixed = dict(TINY_LLAMA, vocab_size=10, hidden_size=64, num_hidden_layers=1)
    f = one(doctor.check_int8_small_tensors(ctx_of(int8, mixed)))
    frac = (2 * 2048 + 3 * 3072 + 3 * 64 + 2 * 640) / (2 * 4096 + 2 * 2048 + 3 * 3072 + 3 * 64 + 2 * 640)
    assert f.data["fp32_fraction"] == pytest.approx(frac) and f.data["small_tensors"] == 10
    assert f.data["moment_bytes_per_element"] == pytest.approx((1 - frac) * (2 + 8 / 256) + frac * 8)
    # LoRA: the adapters are what trains (PEFT's Llama default q_proj, v_proj; or all-linear)
    f = one(doctor.check_int8_small_tensors(ctx_of(with_(int8, lora_r=8), TINY_LLAMA)))
    assert "(LoRA r=8 on q_proj,v_proj): 8 of 8" in f.message and f.data["elements"] == 2 * (256 + 256 + 256 + 128)
    cfg = dict(int8, lora={"r": 4, "target_modules": "all-linear"})
    f = one(doctor.check_int8_small_tensors(ctx_of(cfg, TINY_LLAMA)))
    assert f.data["tensors"] == 2 * 7 * 2  # 7 linear layers per block, lm_head left out
    llama_7b = dict(TINY_LLAMA, vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                    num_attention_heads=32, num_key_value_heads=32)
    for quiet, model in ((int8, llama_7b),  # norms of 4096 elements: quantized too
                         (with_(int8, lora_r=8), llama_7b),  # lora_A 8 x 4096
                         (int8, None), (SANE_FLAGS, TINY_LLAMA), (with_(int8, state_dtype="bf16"), TINY_LLAMA),
                         (with_(SANE_HF, state_dtype="int8", optim="adamw_torch"), TINY_LLAMA)):
        assert doctor.check_int8_small_tensors(ctx_of(quiet, model)) == [], quiet


def test_check_bnb_8bit_with_sharding():
    bnb = with_(SANE_HF, optim="adamw_bnb_8bit")
    f = one(doctor.check_bnb_8bit_with_sharding(ctx_of(with_(bnb, world_size=8))), "bnb-8bit-with-sharding")
    assert f.data == {"optim": "adamw_bnb_8bit", "sharded_by": "world_size 8"} and "state_dtype='int8'" in f.fix
    for extra, by in ((dict(deepspeed="ds.json"), "DeepSpeed"), (dict(zero_optimization={"stage": 2}), "DeepSpeed"),
                      (dict(fsdp="full_shard auto_wrap"), "FSDP"), (dict(nproc_per_node=2), "world_size 2")):
        assert one(doctor.check_bnb_8bit_with_sharding(ctx_of(with_(bnb, **extra)))).data["sharded_by"] == by
    for optim in ("paged_adamw_8bit", "lion_8bit", "bnb.optim.AdamW8bit"):
        assert one(doctor.check_bnb_8bit_with_sharding(ctx_of(with_(bnb, optim=optim, world_size=2))))
    for quiet in (bnb, with_(bnb, fsdp="", deepspeed=None, world_size=1), with_(SANE_HF, world_size=8),
                  with_(SANE_FLAGS, state_dtype="int8", world_size=8)):
        assert doctor.check_bnb_8bit_with_sharding(ctx_of(quiet)) == [], quiet


@pytest.mark.parametrize("over,key,text", [
    (dict(state_dtype="int4"), "state_dtype", "state_dtype='int4' is not one of fp32, bf16, int8"),
    (dict(state_dtype="int8", rule="lomo"), "state_dtype", "rule='lomo' keeps none"),
    (dict(kahan_sum=True), "master_dtype", "needs master_dtype=None"),
    (dict(kahan_sum=True, master_dtype=None, rule="adalomo"), "kahan_sum", "not adalomo"),
])
def test_precision_options_the_optimizer_refuses(over, key, text):
    """What ShardedAdamW's constructor raises for (zeroadamw.options.validate_precision) is an invalid-value."""
    f = one(doctor.check_invalid_values(ctx_of(with_(SANE_FLAGS, **over))), "invalid-value")
    assert f.data == {"key": key} and text in f.message
    import torch

    from zeroadamw import ShardedAdamW

    kw = {"master_dtype": None} if over.get("master_dtype", 0) is None else {}
    kw.update({k: v for k, v in over.items() if k in ("state_dtype", "kahan_sum", "rule")})
    with pytest.raises(ValueError):
        ShardedAdamW([torch.nn.Parameter(torch.zeros(8, dtype=torch.bfloat16))], **kw)
    assert doctor.check_invalid_values(ctx_of(with_(SANE_FLAGS, state_dtype="int8", master_dtype=None,
                                                    kahan_sum=True))) == []
