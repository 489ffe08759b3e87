"""zeroadamw doctor: every finding fires on a config built to trigger it and stays silent on sane configs."""

from __future__ import annotations

import json
import math

import pytest

from zeroadamw import cli
from zeroadamw.doctor import CODES, Finding, diagnose, hf_default_optim, model_parameters, parse_flags, summarize

# A sane HF TrainingArguments-style config: tau = 1/(1e-4 * 0.1) = 100k steps = 5 epochs, run = 3 epochs of 20k
# steps (within [1/2 epoch, 2 x run]); warm-up 1000 steps (1.7 %); 1/(1-beta2) = 1000 steps (1.7 % of the run).
SANE_HF = {
    "output_dir": "out", "learning_rate": 1e-4, "weight_decay": 0.1, "adam_beta1": 0.9, "adam_beta2": 0.999,
    "adam_epsilon": 1e-8, "num_train_epochs": 3, "steps_per_epoch": 20000, "warmup_steps": 1000,
    "lr_scheduler_type": "cosine", "gradient_accumulation_steps": 4, "max_grad_norm": 1.0, "optim": "adamw_torch",
    "per_device_train_batch_size": 8, "decay_embeddings": False,
}
# Our launch flags, independent decay: tau = 1/5e-5 = 20k steps = the run (4 epochs of 5k steps); step in backward
# with exact clipping (which honours accumulation and fp16 loss scaling).
SANE_FLAGS = {
    "lr": 3e-4, "weight_decay": 5e-5, "decay": "independent", "betas": [0.9, 0.95], "steps": 20000,
    "steps_per_epoch": 5000, "warmup_steps": 500, "lr_scheduler_type": "cosine", "no_decay_groups": True,
    "decay_embeddings": False, "stage": 2, "step_in_backward": True, "max_grad_norm": 1.0, "grad_accum": 4,
    "fp16": True,
}

TINY_LLAMA = {
    "model_type": "llama", "vocab_size": 97, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": False,
}


def codes(findings):
    return [f.code for f in findings]


def with_(base, drop=(), **over):
    cfg = {k: v for k, v in base.items() if k not in drop}
    cfg.update(over)
    return cfg


# code -> list of (config, expected severity); each config is a sane one with the fewest changes that trigger it
TRIGGERS = {
    "invalid-value": [(with_(SANE_HF, adam_beta2=1.0), "error"), (with_(SANE_FLAGS, decay="weird"), "error"),
                      (with_(SANE_FLAGS, stage=1), "error")],
    "tau-too-short": [
        (with_(SANE_HF, weight_decay=50.0), "warn"),  # tau = 200 steps = 0.01 epoch
        (with_(SANE_FLAGS, weight_decay=0.1), "warn"),  # independent with torch's usual 0.1: tau = 10 steps
        (with_(SANE_FLAGS, weight_decay=1.0), "error"),  # independent, factor 1 - 1 = 0
        (with_(SANE_HF, learning_rate=1e-2, weight_decay=200.0), "error"),  # lr * wd = 2
        (with_(SANE_HF, drop=("steps_per_epoch", "num_train_epochs"), max_steps=100000, weight_decay=2000.0),
         "warn"),  # single-pass run: tau = 5 steps < 2 % of 100k
    ],
    "tau-too-long": [(with_(SANE_HF, learning_rate=2e-5, weight_decay=0.01), "warn"),
                     (with_(SANE_FLAGS, weight_decay=1e-6), "warn")],
    "tau-undefined": [(with_(SANE_HF, weight_decay=0.0), "info")],
    "l2-with-adam": [(with_(SANE_FLAGS, decay="l2", weight_decay=1e-4), "warn"),
                     (with_(SANE_HF, optim="rmsprop"), "warn")],
    "decay-on-norms-biases": [(with_(SANE_FLAGS, drop=("no_decay_groups",)), "warn"),  # model.parameters()
                              (with_(SANE_HF, no_decay_groups=False), "warn"),
                              (with_(SANE_HF, no_decay=["bias"]), "warn")],  # norms not matched
    "decay-on-embeddings": [(with_(SANE_HF, drop=("decay_embeddings",)), "info")],  # HF Trainer decays them
    "decay-ignored": [(with_(SANE_HF, optim="lomo", gradient_accumulation_steps=1, max_grad_norm=0.0), "warn")],
    "warmup-missing": [(with_(SANE_HF, warmup_steps=0), "warn"), (with_(SANE_FLAGS, drop=("warmup_steps",)), "warn")],
    "warmup-too-long": [(with_(SANE_HF, warmup_steps=0.4), "warn"), (with_(SANE_HF, warmup_steps=60000), "error"),
                        (with_(SANE_HF, drop=("warmup_steps",), warmup_ratio=0.3), "warn")],
    "warmup-ignored": [(with_(SANE_HF, lr_scheduler_type="constant"), "warn")],
    "beta2-too-long-for-run": [(with_(SANE_HF, adam_beta2=0.99999), "warn"),
                               (with_(SANE_HF, drop=("num_train_epochs",), max_steps=2000, warmup_steps=100), "warn")],
    "accumulation-unsupported": [(with_(SANE_HF, optim="lomo", weight_decay=0.0, max_grad_norm=0.0), "error")],
    "clipping-unsupported": [(with_(SANE_HF, optim="adalomo", weight_decay=0.0, gradient_accumulation_steps=1),
                              "error")],
    "accumulation-needs-no-sync": [(with_(SANE_FLAGS, drop=("max_grad_norm", "fp16")), "info")],
    "fp16-fused-step-in-backward": [(with_(SANE_FLAGS, drop=("max_grad_norm",), grad_accum=1), "error")],
    "ddp-with-stage-2": [(with_(SANE_FLAGS, grads_reduced=True, step_in_backward=False), "error")],
    "resume-without-optimizer-state": [
        (with_(SANE_HF, resume_from_checkpoint="out/checkpoint-500", load_optimizer=False), "error"),
        (with_(SANE_HF, resume_from_checkpoint=True, save_only_model=True), "error"),
    ],
    "resume-data-not-skipped": [(with_(SANE_HF, resume_from_checkpoint=True, ignore_data_skip=True), "info")],
    "independent-without-schedule-peak": [(with_(SANE_FLAGS, lr_scheduler_type="my_custom_ramp"), "warn"),
                                          (with_(SANE_FLAGS, drop=("lr_scheduler_type",)), "warn"),
                                          (with_(SANE_FLAGS, lr_max=1e-3), "warn")],
    "run-length-unknown": [(with_(SANE_HF, drop=("steps_per_epoch",)), "info"),
                           (with_(SANE_HF, drop=("steps_per_epoch",), weight_decay=0.0), "info")],
    "steps-per-epoch-unknown": [(with_(SANE_HF, drop=("steps_per_epoch", "num_train_epochs"), max_steps=60000),
                                 "info")],
    "no-master-no-kahan": [(with_(SANE_FLAGS, master_dtype=None, param_dtype="bf16"), "warn"),
                           (with_(SANE_FLAGS, master_dtype="none"), "warn"),  # params' dtype not given
                           (with_(SANE_HF, optim="zeroadamw", optim_args="master_dtype=none", torch_dtype="float16"),
                            "warn"),
                           (with_(SANE_FLAGS, rule="adalomo", master_dtype=None), "warn"),
                           (with_(SANE_HF, model_init_kwargs={"torch_dtype": "bfloat16"}), "warn")],  # torch AdamW
    "int8-small-tensors": [(with_(SANE_FLAGS, state_dtype="int8"), "info"),  # with TINY_LLAMA: every tensor < 4096
                           (with_(SANE_FLAGS, state_dtype="int8", lora_r=8), "info")],
    "bnb-8bit-with-sharding": [(with_(SANE_HF, optim="adamw_bnb_8bit", world_size=8), "info"),
                               (with_(SANE_HF, optim="paged_adamw_8bit", deepspeed="ds_zero2.json"), "info"),
                               ({"optimizer": {"type": "AdamW8bit", "params": {"lr": 1e-4}}, "fsdp": "full_shard"},
                                "info")],
}
# the model a trigger needs (the findings that count the model's tensors)
TRIGGER_MODELS = {"int8-small-tensors": TINY_LLAMA}


def test_every_code_has_a_trigger():
    assert set(TRIGGERS) == set(CODES)


@pytest.mark.parametrize("cfg", [SANE_HF, SANE_FLAGS], ids=["hf", "flags"])
def test_sane_configs_are_silent(cfg):
    findings, summary = summarize(cfg)
    assert findings == [], [f.to_dict() for f in findings]
    assert summary["counts"] == {"info": 0, "warn": 0, "error": 0}


def test_sane_config_with_model_is_silent():
    assert diagnose(SANE_HF, TINY_LLAMA) == []
    assert diagnose(SANE_FLAGS, TINY_LLAMA, use_transformers=False) == []


@pytest.mark.parametrize("code,i", [(c, i) for c, cases in TRIGGERS.items() for i in range(len(cases))])
def test_finding_triggers(code, i):
    cfg, severity = TRIGGERS[code][i]
    found = [f for f in diagnose(cfg, TRIGGER_MODELS.get(code), use_transformers=False) if f.code == code]
    assert found, f"{code} did not fire on {cfg}"
    assert found[0].severity == severity
    for f in found:  # what / why / fix are real sentences, and everything is JSON-able
        assert f.message and f.why and f.fix and f.code in CODES
        json.dumps(f.to_dict())


def test_findings_sorted_errors_first():
    f = diagnose(with_(SANE_HF, weight_decay=0.0, warmup_steps=0, resume_from_checkpoint=True, load_optimizer=False))
    sev = [x.severity for x in f]
    assert sev == sorted(sev, key=["error", "warn", "info"].index)
    assert {"resume-without-optimizer-state", "warmup-missing", "tau-undefined"} <= set(codes(f))


# ------------------------------------------------------------------------------------------------ timescale
def test_tau_decoupled_and_epochs():
    _, s = summarize(SANE_HF)
    assert s["tau_steps"] == pytest.approx(1 / (1e-4 * 0.1))
    assert s["tau_epochs"] == pytest.approx(5.0)
    assert s["total_steps"] == 60000 and s["run_epochs"] == pytest.approx(3.0)
    assert s["tau_band_steps"] == [20000, 60000]


def test_tau_independent_is_one_over_lambda():
    _, s = summarize(SANE_FLAGS)
    assert s["decay"] == "independent"
    assert s["tau_steps"] == pytest.approx(1 / 5e-5)  # lr does not enter
    _, s2 = summarize(with_(SANE_FLAGS, lr=1e-3))
    assert s2["tau_steps"] == pytest.approx(s["tau_steps"])


def test_tau_uses_schedule_peak_when_given():
    _, s = summarize(with_(SANE_HF, lr_scheduler_kwargs={"max_lr": 2e-4}))
    assert s["tau_steps"] == pytest.approx(1 / (2e-4 * 0.1))


def test_tau_too_long_fix_gives_weight_decay_range():
    f = next(x for x in diagnose(with_(SANE_HF, learning_rate=2e-5, weight_decay=0.01)) if x.code == "tau-too-long")
    lo, hi = f.data["weight_decay_range"]
    # tau between 1 epoch (20k steps) and the run (60k): wd = 1/(lr * tau)
    assert lo == pytest.approx(1 / (2e-5 * 60000)) and hi == pytest.approx(1 / (2e-5 * 20000))


def test_l2_has_no_tau_but_sgd_l2_does():
    _, s = summarize(with_(SANE_FLAGS, decay="l2", weight_decay=1e-4))
    assert s["tau_steps"] is None
    f, s = summarize(with_(SANE_FLAGS, decay="l2", rule="lomo", weight_decay=0.1))  # SGD: L2 == decoupled
    assert "l2-with-adam" not in codes(f)
    assert s["tau_steps"] == pytest.approx(1 / (3e-4 * 0.1))


def test_run_length_conventions():
    # steps_per_epoch counts optimizer steps
    assert summarize(with_(SANE_HF, num_train_epochs=2.5))[1]["total_steps"] == 50000
    # batches_per_epoch counts micro-batches: // gradient_accumulation_steps, as HF Trainer does
    cfg = with_(SANE_HF, drop=("steps_per_epoch",), batches_per_epoch=80003)
    assert summarize(cfg)[1]["steps_per_epoch"] == 20000
    # samples / (batch * world) micro-batches per epoch
    cfg = with_(SANE_HF, drop=("steps_per_epoch",), num_train_samples=1_280_000, world_size=2)
    assert summarize(cfg)[1]["steps_per_epoch"] == 1_280_000 // (8 * 2) // 4
    # max_steps wins over epochs
    assert summarize(with_(SANE_HF, max_steps=1234))[1]["total_steps"] == 1234
    # HF: warmup_steps < 1 is a ratio of the run
    assert summarize(with_(SANE_HF, warmup_steps=0.05))[1]["warmup_steps"] == 3000


def test_hf_defaults_are_assumed():
    f, s = summarize({"output_dir": "x", "learning_rate": 3e-5})
    # optim: the installed transformers' default (adamw_torch_fused with torch >= 2.8), see test_hf_default_optim_*
    assert s["weight_decay"] == 0.0 and s["betas"] == [0.9, 0.999] and s["optimizer"] == hf_default_optim()
    assert f"optim={hf_default_optim()!r}" in s["assumed"]
    assert "tau-undefined" in codes(f) and "run-length-unknown" in codes(f)
    assert any(a.startswith("weight_decay") for a in s["assumed"])


def test_our_keys_in_hf_form_mean_zeroadamw():
    _, s = summarize(with_(SANE_HF, drop=("optim",), decay="independent", weight_decay=1e-5))
    assert s["optimizer"] == "zeroadamw" and s["decay"] == "independent"
    _, s = summarize(with_(SANE_HF, optim="zeroadamw", optim_args="decay=independent,stage=1", weight_decay=1e-5))
    assert s["decay"] == "independent"


def test_deepspeed_style_optimizer_section():
    cfg = {"optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "betas": [0.9, 0.95], "weight_decay": 0.1}},
           "max_steps": 100000, "steps_per_epoch": 50000, "warmup_steps": 1000, "no_decay_groups": True,
           "decay_embeddings": False, "lr_scheduler_type": "cosine"}
    f, s = summarize(cfg)
    assert s["betas"] == [0.9, 0.95] and s["learning_rate"] == 1e-4 and s["decay"] == "decoupled"
    assert codes(f) == []


# ------------------------------------------------------------------------------------------------- the model
def test_model_params_transformers_matches_llama_layout():
    pytest.importorskip("transformers")
    a = model_parameters(TINY_LLAMA)
    b = model_parameters(TINY_LLAMA, use_transformers=False)
    assert [(p.name, p.numel, p.kind, p.shape) for p in a] == [(p.name, p.numel, p.kind, p.shape) for p in b]
    assert all(math.prod(p.shape) == p.numel for p in a)
    from transformers import LlamaConfig, LlamaForCausalLM

    ref = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in TINY_LLAMA.items() if k != "model_type"}))
    assert sum(p.numel for p in a) == sum(p.numel() for p in ref.parameters())


def test_model_params_tied_and_biases():
    cfg = dict(TINY_LLAMA, tie_word_embeddings=True, attention_bias=True)
    for use in (True, False):
        ps = model_parameters(cfg, use_transformers=use)
        names = [p.name for p in ps]
        assert "lm_head.weight" not in names  # tied: one tensor, listed as the embedding
        assert sum(p.kind == "bias" for p in ps) == 2 * 4
        assert sum(p.kind == "norm" for p in ps) == 2 * 2 + 1
        assert [p.kind for p in ps].count("embedding") == 1


def test_decay_findings_name_the_params():
    f, s = summarize(with_(SANE_FLAGS, drop=("no_decay_groups", "decay_embeddings")), TINY_LLAMA)
    nb = next(x for x in f if x.code == "decay-on-norms-biases")
    assert "model.layers.0.input_layernorm.weight" in nb.data["params"]
    assert nb.data["elements"] == 5 * 32
    emb = next(x for x in f if x.code == "decay-on-embeddings")
    assert emb.data["params"] == ["model.embed_tokens.weight"] and emb.data["elements"] == 97 * 32
    assert s["params"]["decayed"] == s["params"]["total"]
    # HF Trainer's split: norms excluded, embeddings decayed
    f, s = summarize(with_(SANE_HF, drop=("decay_embeddings",)), TINY_LLAMA)
    assert codes(f) == ["decay-on-embeddings"]
    assert s["params"]["total"] - s["params"]["decayed"] == 5 * 32
    # explicit patterns decide alone
    f = diagnose(with_(SANE_HF, no_decay=[r"norm", r"bias", r"embed"]), TINY_LLAMA)
    assert codes(f) == []


def test_no_decay_findings_without_weight_decay():
    f = diagnose(with_(SANE_FLAGS, drop=("no_decay_groups", "decay_embeddings"), weight_decay=0.0), TINY_LLAMA)
    assert "decay-on-norms-biases" not in codes(f) and "decay-on-embeddings" not in codes(f)


# --------------------------------------------------------------------------------------------- input / CLI
def test_parse_flags():
    cfg = parse_flags(["train.py", "--lr", "3e-4", "--weight-decay=0.1", "--step-in-backward", "--betas", "0.9,0.95",
                       "--decay", "independent", "--resume", "ckpt/step-10"])
    assert cfg == {"format": "flags", "lr": 3e-4, "weight_decay": 0.1, "step_in_backward": True,
                   "betas": [0.9, 0.95], "decay": "independent", "resume": "ckpt/step-10"}


def test_finding_validates_code_and_severity():
    with pytest.raises(ValueError):
        Finding("no-such-code", "warn", "m", "w", "f")
    with pytest.raises(ValueError):
        Finding("tau-too-long", "fatal", "m", "w", "f")


def test_cli_json_and_exit_codes(tmp_path, capsys):
    sane = tmp_path / "sane.json"
    sane.write_text(json.dumps(SANE_HF))
    assert cli.main(["doctor", str(sane), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["findings"] == [] and out["summary"]["tau_epochs"] == pytest.approx(5.0)

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(with_(SANE_HF, resume_from_checkpoint=True, load_optimizer=False, warmup_steps=0)))
    assert cli.main(["doctor", str(bad), "--json"]) == 1
    out = json.loads(capsys.readouterr().out)
    assert {f["code"] for f in out["findings"]} == {"resume-without-optimizer-state", "warmup-missing"}
    assert set(out["findings"][0]) == {"code", "severity", "message", "why", "fix", "data"}

    assert cli.main(["doctor", str(bad)]) == 1  # human-readable
    text = capsys.readouterr().out
    assert "ERROR resume-without-optimizer-state" in text and "why:" in text and "fix:" in text

    flags = tmp_path / "launch.sh"
    flags.write_text("# our launcher\ntorchrun train.py --lr 3e-4 --weight-decay 0.1 \\\n"
                     "  --steps 2000 --warmup-steps 100\n")
    assert cli.main(["doctor", str(flags), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["summary"]["format"] == "flags" and out["summary"]["total_steps"] == 2000
    assert "decay-on-norms-biases" in {f["code"] for f in out["findings"]}

    assert cli.main(["doctor", str(tmp_path / "missing.json")]) == 2
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    assert cli.main(["doctor", str(broken)]) == 2


def test_cli_with_model(tmp_path, capsys):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps(with_(SANE_FLAGS, drop=("no_decay_groups",))))
    model = tmp_path / "config.json"
    model.write_text(json.dumps(TINY_LLAMA))
    assert cli.main(["doctor", str(cfg), "--model", str(model), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [f["code"] for f in out["findings"]] == ["decay-on-norms-biases"]
    assert out["summary"]["params"]["tensors"] == 1 + 2 * 9 + 1 + 1


def test_real_training_arguments_dump():
    transformers = pytest.importorskip("transformers")
    args = transformers.TrainingArguments(output_dir="/tmp/zeroadamw-doctor-test", learning_rate=2e-5,
                                          weight_decay=0.01, num_train_epochs=1, report_to=[])
    cfg = json.loads(args.to_json_string())
    cfg["steps_per_epoch"] = 500
    f, s = summarize(cfg)
    assert s["format"] == "hf" and s["total_steps"] == 500 and not math.isnan(s["tau_steps"])
    assert "tau-too-long" in codes(f) and "warmup-missing" in codes(f)


def test_every_code_is_documented():
    import zeroadamw.doctor as doctor

    for code in CODES:
        assert f"``{code}``" in doctor.__doc__, code


# ------------------------------------------------------------------------------------- user-reported defects
def test_suggested_warmup_is_rounded_not_truncated():
    # 2/(1-0.999) is 1999.999... in floating point: the doctor used to suggest 1999 steps
    f = next(x for x in diagnose({"output_dir": "x", "learning_rate": 1e-4}) if x.code == "warmup-missing")
    assert f.data["suggested_warmup_steps"] == 2000
    assert "`warmup_steps: 2000`" in f.fix
    f = next(x for x in diagnose(with_(SANE_FLAGS, warmup_steps=0, steps=10**6)) if x.code == "warmup-missing")
    assert f.data["suggested_warmup_steps"] == 40  # betas (0.9, 0.95): 2/(1-0.95) = 39.99999999999996


def test_warmup_suggestion_with_beta2_one_does_not_crash():
    # beta2 = 1 (invalid) without a run length used to raise OverflowError (int of an infinite horizon)
    f = diagnose({"output_dir": "x", "learning_rate": 1e-4, "adam_beta2": 1.0})
    assert "invalid-value" in codes(f)
    assert next(x for x in f if x.code == "warmup-missing").data["suggested_warmup_steps"] == 100


def test_hf_default_optim_is_the_installed_transformers_default():
    transformers = pytest.importorskip("transformers")
    import dataclasses

    real = next(f.default for f in dataclasses.fields(transformers.TrainingArguments) if f.name == "optim")
    real = getattr(real, "value", real)
    assert hf_default_optim() == real
    f, s = summarize({"output_dir": "x", "learning_rate": 3e-5, "weight_decay": 0.01, "max_steps": 1000})
    assert s["optimizer"] == real and f"optim={real!r}" in s["assumed"]
    assert s["decay"] == "decoupled" and s["rule"] == "adamw"


def test_hf_default_optim_without_transformers(monkeypatch):
    import importlib.metadata
    import sys

    import zeroadamw.doctor as doctor

    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` raises ImportError
    for torch_version, expected in (("2.13.0+cpu", "adamw_torch_fused"), ("2.8.0", "adamw_torch_fused"),
                                    ("2.7.1", "adamw_torch")):
        monkeypatch.setattr(doctor, "_hf_default_optim", None)  # the cache
        monkeypatch.setattr(importlib.metadata, "version", lambda name, v=torch_version: v)
        assert doctor.hf_default_optim() == expected, torch_version
        assert summarize({"output_dir": "x"})[1]["optimizer"] == expected


@pytest.mark.parametrize("optim", ["adamw_torch", "adamw_torch_fused"])
def test_both_torch_adamw_names_are_decoupled_adamw(optim):
    assert diagnose(with_(SANE_HF, optim=optim)) == []
    f, s = summarize(with_(SANE_HF, optim=optim, warmup_steps=0, learning_rate=2e-5, weight_decay=0.01))
    assert s["optimizer"] == optim and s["decay"] == "decoupled" and s["rule"] == "adamw"
    assert codes(f) == ["tau-too-long", "warmup-missing"]


def _zeroadamw_cmd():
    import shutil
    import sys
    from pathlib import Path

    script = Path(sys.executable).with_name("zeroadamw")  # the console script of this venv
    if script.exists():
        return [str(script)]
    return [shutil.which("zeroadamw")] if shutil.which("zeroadamw") else [sys.executable, "-m", "zeroadamw.cli"]


def _env(unbuffered=False):
    import os
    from pathlib import Path

    src = str(Path(__file__).resolve().parents[1] / "src")
    env = dict(os.environ, PYTHONPATH=src + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("PYTHONUNBUFFERED", None)
    if unbuffered:  # stdout write-through: the broken pipe shows at the write, not at the flush
        env["PYTHONUNBUFFERED"] = "1"
    return env


def test_cli_broken_pipe_after_one_line_is_quiet(tmp_path):
    """`zeroadamw doctor F | head -1`: the reader closes after one line; no traceback."""
    import subprocess

    # an output far larger than a pipe's buffer (64 KiB), so the doctor is still writing when the reader closes
    cfg = tmp_path / "big.json"
    cfg.write_text(json.dumps(with_(SANE_FLAGS, rule="x" * 150_000)))
    p = subprocess.Popen(_zeroadamw_cmd() + ["doctor", str(cfg)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         env=_env())
    first = p.stdout.readline()
    p.stdout.close()
    err = p.stderr.read().decode()
    rc = p.wait(timeout=120)
    assert first.startswith(b"zeroadamw doctor: ")
    assert "Traceback" not in err and "BrokenPipe" not in err, err
    assert rc == 141


@pytest.mark.parametrize("unbuffered", [False, True], ids=["buffered", "unbuffered"])
@pytest.mark.parametrize("args", [["doctor", "CFG"], ["doctor", "CFG", "--json"], ["--help"]])
def test_cli_into_a_closed_pipe_is_quiet(tmp_path, args, unbuffered):
    import os
    import subprocess

    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps(SANE_HF))
    r, w = os.pipe()
    os.close(r)  # the reader is gone before the first write
    try:
        p = subprocess.run(_zeroadamw_cmd() + [str(cfg) if a == "CFG" else a for a in args], stdout=w,
                           stderr=subprocess.PIPE, env=_env(unbuffered), timeout=120)
    finally:
        os.close(w)
    err = p.stderr.decode()
    assert "Traceback" not in err and "BrokenPipe" not in err, err
    # argparse itself ignores a failed write of --help (then exits 0); a buffered --help fails at our flush
    assert p.returncode == (0 if unbuffered and args == ["--help"] else 141)


@pytest.mark.parametrize("argv", [["--help"], ["doctor", "--help"]])
def test_cli_help_is_plain_text(capsys, argv):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "usage: zeroadamw" in out
    for markup in ("``", ":class:", ":func:", ":data:", ":math:", "**", ".. "):
        assert markup not in out, (markup, out)


def test_cli_help_strips_rst_from_any_command(monkeypatch, capsys):
    """A command whose add_arguments uses its RST docstring as the description gets plain --help too."""
    import sys
    import types

    fake = types.ModuleType("zeroadamw_fake_command")

    def add_arguments(parser):
        parser.description = ("``zeroadamw fake``: see :class:`~zeroadamw.ShardedAdamW` and :func:`diagnose`.\n\n"
                              "Example::\n\n    zeroadamw fake X\n\n.. code-block:: python\n\n    **bold** `x`")
        parser.add_argument("x", help="a ``literal`` and :data:`TAU_TOLERANCE`")
        parser.epilog = "*emphasis* and `a link <https://example.org>`_"

    fake.add_arguments, fake.run = add_arguments, lambda args: 0
    monkeypatch.setitem(sys.modules, fake.__name__, fake)
    monkeypatch.setitem(cli.COMMANDS, "fake", (fake.__name__, "the ``fake`` command (:func:`run`)"))
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    top = capsys.readouterr().out
    assert "the fake command (run)" in top
    with pytest.raises(SystemExit):
        cli.main(["fake", "--help"])
    out = capsys.readouterr().out
    for markup in ("``", ":class:", ":func:", ":data:", "**", ".. code-block", "::", "`", "<https"):
        assert markup not in out, (markup, out)
    assert "zeroadamw fake: see ShardedAdamW and diagnose." in out
    assert "a literal and TAU_TOLERANCE" in out and "emphasis and a link" in out
    assert "Example:" in out


# ------------------------------------------------------------------------------------- state precision summary
@pytest.mark.parametrize("state_dtype,kahan", [(sd, k) for k in (False, True) for sd in ("fp32", "bf16", "int8")])
def test_summary_state_bytes_agree_with_the_estimate(state_dtype, kahan):
    """The doctor's per-element state bytes for bf16 params are the estimate's (12 / 8 / 6.03 / 10 / 6 / 4.03),
    which tests/test_estimate.py checks against ShardedAdamW.state_bytes()."""
    from zeroadamw import estimate as E

    cfg = with_(SANE_FLAGS, state_dtype=state_dtype, param_dtype="bf16",
                **(dict(master_dtype=None, kahan_sum=True) if kahan else {}))
    findings, s = summarize(cfg)
    assert findings == [], [f.to_dict() for f in findings]
    e = E.estimate(E.ModelSpec("w", [("w", (1024, 1024))]), 1, "bf16", bucket_size=2**20, methods=["stage2"],
                   state_dtype=state_dtype, kahan=kahan)[0]
    assert s["precision"]["state_bytes_per_element"] == {"bf16": (e.optimizer_state + e.master) / 2**20}
    assert s["precision"]["moments"] == state_dtype and s["precision"]["kahan_sum"] is kahan
    assert s["precision"]["master_dtype"] == (None if kahan else "fp32")


def test_summary_reports_the_state_storage(tmp_path, capsys):
    _, s = summarize(SANE_FLAGS)  # ShardedAdamW's defaults, params' dtype not given
    assert s["precision"] == {"param_dtype": None, "state_dtype": None, "moments": "fp32", "master_dtype": "fp32",
                              "kahan_sum": False, "weights": "fp32 master", "trainable": None,
                              "state_bytes_per_element": {"bf16/fp16": 12.0, "fp32": 8.0}}
    _, s = summarize(with_(SANE_FLAGS, master_dtype=None, param_dtype="bf16"))  # auto: moments in the param dtype
    assert s["precision"]["moments"] == "bf16" and s["precision"]["state_bytes_per_element"] == {"bf16": 4.0}
    assert summarize(SANE_HF)[1]["precision"] is None  # torch AdamW, nothing said about the weights
    assert summarize(with_(SANE_HF, optim="adamw_8bit"))[1]["precision"] == {"param_dtype": None,
                                                                               "bitsandbytes_8bit": True}
    cfg = tmp_path / "args.json"  # HF form: ShardedAdamW's options through optim_args
    cfg.write_text(json.dumps(with_(SANE_HF, optim="zeroadamw", torch_dtype="bfloat16",
                                    optim_args="state_dtype=int8,master_dtype=none,kahan_sum=true")))
    assert cli.main(["doctor", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert ("  state: int8 moments (tensors under 4096 elements: fp32), Kahan compensation, no master; per trainable "
            "element 4.03 B for bf16 params (/ N per rank)") in out
    assert cli.main(["doctor", str(cfg), "--json"]) == 0
    pr = json.loads(capsys.readouterr().out)["summary"]["precision"]
    assert pr["state_dtype"] == "int8" and pr["kahan_sum"] is True and pr["master_dtype"] is None
    # our keys in the HF form mean optim=zeroadamw
    assert summarize(with_(SANE_HF, drop=("optim",), state_dtype="bf16"))[1]["optimizer"] == "zeroadamw"
