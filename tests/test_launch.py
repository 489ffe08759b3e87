"""launch/finetune_llama.py under `accelerate launch` with the shipped CPU config (2 real processes)."""

import json
import math
import os
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
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "per-rank memory (MiB), zeroadamw" in out.stdout
    assert (tmp_path / "loss.png").stat().st_size > 1000
    rows = json.loads((tmp_path / "memory.json").read_text())
    assert len(rows) == 2  # one row per rank
    for r in rows:
        # sharded over 2 ranks: each holds half of AdamW's state (+ padding < 2 elements per bucket)
        assert abs(r["optimizer_state"] - r["torch_adamw_state"] / 2) <= 64, r
        assert r["grads"] < r["torch_grads"], r
    # diagnostics went into Trainer's logs and were plotted; the weight decay each step used follows the cosine
    # weight-decay schedule over max_steps = 4 (step s used lambda * m(s - 1))
    assert (tmp_path / "diagnostics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    logs = [json.loads(x) for x in (tmp_path / "log_history.jsonl").read_text().splitlines()]
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
