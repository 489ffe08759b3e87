"""launch/finetune_llama.py under `accelerate launch` with the shipped CPU config (2 real processes)."""

import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.dist
@pytest.mark.slow
def test_accelerate_launch_finetune_two_cpu_processes(tmp_path):
    accelerate = os.path.join(os.path.dirname(sys.executable), "accelerate")
    env = dict(os.environ, ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1")
    cmd = [accelerate, "launch", "--config_file", os.path.join(ROOT, "configs", "ddp_cpu.yaml"),
           os.path.join(ROOT, "launch", "finetune_llama.py"), "--max_steps", "4", "--per_device_train_batch_size", "4",
           "--block_size", "64", "--logging_steps", "1", "--learning_rate", "2e-3", "--bucket_size", "262144",
           "--save_strategy", "no", "--report_to", "none", "--disable_tqdm", "true", "--output_dir", str(tmp_path),
           "--weight_decay", "0.1", "--wd_schedule", "cosine"]
    env.pop("DS_ACCELERATOR", None)  # the launcher sets it for a CPU run
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "per-rank memory (MiB), zeroadamw" in out.stdout
    console = out.stdout + out.stderr
    # what a new user sees: what is happening, which loss is which, where the files are -- and no noise
    for msg in ("building model: ", "tokenizing: dataset 'stdlib'", "training on 2 process(es) (cpu, gloo), "
                "ShardedAdamW stage 2, 4 steps of 4 x 64 tokens per process", "evaluating on the validation blocks"):
        assert msg in out.stdout, msg
    assert re.search(r"^train loss \d+\.\d{3} \(step 4; mean over the whole run \d+\.\d{3}\), validation loss "
                     r"\d+\.\d{3} \(perplexity [\d.]+, at the end\)$", out.stdout, re.M), out.stdout[-2000:]
    for name in ("loss.png", "log_history.jsonl", "diagnostics.jsonl", "diagnostics.png", "memory.json"):
        assert re.search(rf"^  {re.escape(os.path.join(str(tmp_path), name))}  +\S", out.stdout, re.M), name
    for noise in ("Setting accelerator to CPU", "pin_memory", "Failed to initialize NumPy", "'diag/"):
        assert noise not in console, noise
    summary = [line for line in out.stdout.splitlines() if line.startswith("diagnostics step ")]
    assert len(summary) == 4 and all(len(line) < 160 for line in summary), summary
    assert (tmp_path / "loss.png").stat().st_size > 1000
    rows = json.loads((tmp_path / "memory.json").read_text())
    assert len(rows) == 2  # one row per rank
    for r in rows:
        # sharded over 2 ranks: each holds half of AdamW's state (+ padding < 2 elements per bucket)
        assert abs(r["optimizer_state"] - r["torch_adamw_state"] / 2) <= 64, r
        assert r["grads"] < r["torch_grads"], r
    # diagnostics went to their own file (not into Trainer's logs) and were plotted; the weight decay each step
    # used follows the cosine weight-decay schedule over max_steps = 4 (step s used lambda * m(s - 1))
    assert (tmp_path / "diagnostics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    history = [json.loads(x) for x in (tmp_path / "log_history.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history if "loss" in h] == [1, 2, 3, 4]
    assert not [k for h in history for k in h if k.startswith("diag/")]
    logs = [json.loads(x) for x in (tmp_path / "diagnostics.jsonl").read_text().splitlines()]
    assert [h["step"] for h in logs if "eval_loss" in h] == [4]  # the final evaluation, for the plot
    diag = [h for h in logs if "diag/decay/weight_decay" in h]
    assert [h["step"] for h in diag] == [1, 2, 3, 4]
    for h in diag:
        want = 0.1 * 0.5 * (1 + math.cos(math.pi * (h["step"] - 1) / 4))
        assert abs(h["diag/decay/weight_decay"] - want) <= 1e-12, h
        assert h["diag/decay/param_norm"] > 0 and h["diag/grad_norm"] == pytest.approx(h["grad_norm"], rel=1e-5)


def test_lora_model_with_nothing_trainable_is_refused():
    from zeroadamw import ShardedAdamW

    lin = torch.nn.Linear(4, 4)
    lin.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        ShardedAdamW(lin.parameters())
