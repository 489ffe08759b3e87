"""launch/finetune_llama.py --qlora on CPU: a 4-bit NF4 base (bitsandbytes Linear4bit) + LoRA adapters trained by
ShardedAdamW stage 2 over 2 real gloo processes (accelerate launch, the shipped CPU config), in each state mode:
fp32 moments (default), bf16 moments, int8 moments, and Kahan summation on bf16 adapters. Each run: a few steps of
the embedded small LLaMA (configs/llama-tiny.json, built, saved to OUTPUT_DIR/qlora_base/ and loaded 4-bit);
checks that it trains, what is 4-bit and what is trainable, that the launcher's memory report holds exactly the
optimizer-state bytes of the mode, and (int8, Kahan) that resuming from the step-4 checkpoint reproduces the
uninterrupted run's losses.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCHER = os.path.join(ROOT, "launch", "finetune_llama.py")
WORLD = 2
BLOCK = 256  # zeroadamw.quant.BLOCK: int8 moments keep one fp32 absmax per 256 elements
MIN_INT8 = 4096  # zeroadamw.quant.MIN_QUANTIZED_NUMEL: smaller params keep fp32 moments

# mode -> (launcher flags, adapter dtype, storage kind of the >= 4096-element params, of the smaller ones)
MODES = {
    "fp32": ([], "float32", "fp32", "fp32"),
    "bf16": (["--state_dtype", "bf16"], "float32", "bf16", "bf16"),
    "int8": (["--state_dtype", "int8"], "float32", "int8", "fp32"),
    "kahan": (["--torch_dtype", "bfloat16", "--kahan_sum"], "bfloat16", "fp32+kahan", "fp32+kahan"),
}
# state bytes per element of each storage kind, and the alignment of its buckets' shards
BYTES = {"fp32": 8, "bf16": 4, "int8": 2, "fp32+kahan": 8 + 2}
ALIGN = {"int8": BLOCK}
RESUMED = ("int8", "kahan")


def expected_state_bytes(trainable: dict[str, list], big: str, small: str) -> dict[str, dict[str, int]]:
    """Per-rank state bytes by storage kind, from the trainable params' shapes: one bucket per kind (the launcher's
    default bucket size holds every adapter), padded to a multiple of WORLD (x 256 for int8), 1/WORLD per rank."""
    numel = {}
    for shape, _ in trainable.values():
        n = math.prod(shape)
        kind = big if n >= MIN_INT8 else small
        a = ALIGN.get(kind, 1)
        numel[kind] = numel.get(kind, 0) + -(-n // a) * a  # int8: every param starts on a block boundary
    out = {}
    for kind, n in numel.items():
        a = ALIGN.get(kind, 1)
        shard = -(-n // (WORLD * a)) * a
        b = shard * BYTES[kind] + (2 * 4 * (shard // BLOCK) if kind == "int8" else 0)
        out[kind] = {"numel": sum(math.prod(s) for s, _ in trainable.values()
                                  if (big if math.prod(s) >= MIN_INT8 else small) == kind), "bytes": b}
    return out


def launch(out_dir, *flags: str, max_steps: int = 4, save: bool = False, resume: str | None = None):
    accelerate = os.path.join(os.path.dirname(sys.executable), "accelerate")
    env = dict(os.environ, ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1")
    cmd = [accelerate, "launch", "--config_file", os.path.join(ROOT, "configs", "ddp_cpu.yaml"), LAUNCHER,
           "--qlora", "--max_steps", str(max_steps), "--per_device_train_batch_size", "2", "--block_size", "32",
           "--validation_fraction", "0.001", "--logging_steps", "1", "--learning_rate", "1e-2",
           "--weight_decay", "0.01", "--seed", "0", "--report_to", "none", "--disable_tqdm", "true",
           "--diagnostics", "false", "--output_dir", str(out_dir), *flags]
    cmd += ["--save_strategy", "steps", "--save_steps", "4"] if save or resume else ["--save_strategy", "no"]
    if resume:
        cmd += ["--resume_from_checkpoint", resume]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


def losses(out_dir) -> dict[int, float]:
    history = [json.loads(x) for x in (out_dir / "log_history.jsonl").read_text().splitlines()]
    return {h["step"]: h["loss"] for h in history if "loss" in h}


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.parametrize("mode", list(MODES))
def test_qlora_launcher_trains_4bit_base_with_each_state_mode(tmp_path, mode):
    pytest.importorskip("bitsandbytes")
    pytest.importorskip("peft")
    flags, adapter_dtype, big, small = MODES[mode]
    resumed = mode in RESUMED
    run = tmp_path / "run"
    out = launch(run, *flags, max_steps=6 if resumed else 4, save=resumed)

    # the base: built from configs/llama-tiny.json, saved, loaded 4-bit -- every projection a bnb Linear4bit
    assert (run / "qlora_base" / "config.json").is_file()
    model = json.loads((run / "model.json").read_text())
    assert model["qlora"] and model["linear4bit_layers"] == 4 * 7, model  # 4 layers x q k v o gate up down
    assert "Params4bit" in model["param_classes"], model
    assert "  4-bit: 28 bitsandbytes Linear4bit layers (NF4, compute bfloat16)" in out.stdout
    # only LoRA adapters train: A and B of q k v o in 4 layers, in the adapter dtype of the mode
    trainable = model["trainable"]
    assert len(trainable) == 4 * 4 * 2 and all(".lora_A." in n or ".lora_B." in n for n in trainable), trainable
    assert {d for _, d in trainable.values()} == {adapter_dtype}
    assert model["trainable_params"] == sum(math.prod(s) for s, _ in trainable.values()) < model["params"] / 10

    # it trains: finite losses that go down over the few steps
    loss = losses(run)
    assert sorted(loss) == list(range(1, (6 if resumed else 4) + 1)), loss
    assert all(math.isfinite(v) for v in loss.values()) and loss[4] < loss[1] - 0.2, loss

    # the memory report: this mode's optimizer-state bytes exactly, on both ranks
    rows = json.loads((run / "memory.json").read_text())
    assert len(rows) == WORLD
    want = expected_state_bytes(trainable, big, small)
    for r in rows:
        assert r["optimizer_state_by_storage"] == want, (r, want)
        assert r["optimizer_state"] == sum(d["bytes"] for d in want.values()), r
    n = model["trainable_params"]
    ratio = rows[0]["optimizer_state"] / (8 * n / WORLD)  # vs fp32 Adam's 8 bytes per element, sharded
    assert ratio == pytest.approx({"fp32": 1.0, "bf16": 0.5, "int8": 0.3605, "kahan": 1.25}[mode], abs=2e-3), ratio
    if mode == "int8":  # the k/v lora_B (128 x 16 = 2,048 elements) stay fp32: the launcher says so
        assert "16,384 of the 114,688 trainable elements are in smaller params, which keep fp32 moments" in out.stdout
    assert "optimizer state of rank 0 by moment storage" in out.stdout or mode == "fp32"

    if resumed:  # from checkpoint-4 (adapters + every rank's optimizer shard): steps 5 and 6 as the full run's
        ckpt = run / "checkpoint-4"
        assert (ckpt / "adapter_model.safetensors").is_file() and (ckpt / "zeroadamw_optimizer").is_dir()
        again = tmp_path / "resumed"
        out2 = launch(again, *flags, max_steps=6, resume=str(ckpt))
        assert "fresh state" not in (out2.stdout + out2.stderr).lower()
        assert "training on 2 process(es)" in out2.stdout and "'loss'" in out2.stdout
        loss2 = losses(again)  # Trainer's log history: steps 1-4 from the checkpoint, 5 and 6 trained now
        assert sorted(loss2) == list(range(1, 7)), loss2
        assert all(loss2[s] == loss[s] for s in (1, 2, 3, 4)), (loss, loss2)
        assert loss2[5] == pytest.approx(loss[5], rel=1e-6) and loss2[6] == pytest.approx(loss[6], rel=1e-6), (loss, loss2)
        model2 = json.loads((again / "model.json").read_text())
        assert {d for _, d in model2["trainable"].values()} == {adapter_dtype}  # resume keeps bf16 adapters bf16
        assert json.loads((again / "memory.json").read_text())[0]["optimizer_state_by_storage"] == want


def _launcher_module():
    spec = importlib.util.spec_from_file_location("finetune_llama", LAUNCHER)
    ft = importlib.util.module_from_spec(spec)
    sys.modules["finetune_llama"] = ft  # its dataclasses look their module up there
    spec.loader.exec_module(ft)
    return ft


def test_kahan_and_master_flags_become_sharded_adamw_keywords():
    ft = _launcher_module()
    fp32 = torch.nn.Linear(64, 64)
    bf16 = torch.nn.Linear(64, 64).to(torch.bfloat16)
    z = ft.ZeroArguments
    assert ft.zeroadamw_precision(z(), fp32) == ({}, [])
    assert ft.zeroadamw_precision(z(state_dtype="bf16"), fp32) == ({"state_dtype": "bf16"}, [])
    # --kahan_sum drops the master (ShardedAdamW requires master_dtype=None with kahan_sum)
    assert ft.zeroadamw_precision(z(kahan_sum=True), bf16) == ({"kahan_sum": True, "master_dtype": None}, [])
    assert ft.zeroadamw_precision(z(master_dtype="none"), bf16) == ({"master_dtype": None}, [])
    # fp32 trainables (QLoRA's default adapters): Kahan changes nothing, and the launcher says so
    kw, notes = ft.zeroadamw_precision(z(kahan_sum=True), fp32)
    assert kw == {"kahan_sum": True, "master_dtype": None}
    assert len(notes) == 1 and "changes nothing here" in notes[0] and "--torch_dtype bfloat16" in notes[0]
    with pytest.raises(SystemExit, match="drop --master_dtype fp32"):
        ft.zeroadamw_precision(z(kahan_sum=True, master_dtype="fp32"), bf16)
    # int8: params of < 4096 elements keep fp32 moments -- counted in the note
    kw, notes = ft.zeroadamw_precision(z(state_dtype="int8"), fp32)
    assert kw == {"state_dtype": "int8"} and "64 of the 4,160 trainable elements" in notes[0]
    # the QLoRA dtypes of --torch_dtype: (adapters -- None: PEFT's fp32 --, 4-bit compute)
    assert ft.qlora_dtypes("auto") == (None, torch.bfloat16)
    assert ft.qlora_dtypes("bfloat16") == (torch.bfloat16, torch.bfloat16)
