"""Smoke runs of benchmarks/compare.py (--smoke: 1 step, a tiny Llama, real torchrun processes at N = 1 and 2,
one DeepSpeed mode) and benchmarks/kernel_bandwidth.py (a tiny size): the outputs exist and their numbers are
sane -- the same first loss everywhere, state bytes per rank = AdamW's / N up to padding, counted bytes = the
ring all-reduce of the gradients, every (mode, N) present with a result or a reason."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.dist, pytest.mark.slow, pytest.mark.timeout(600)]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "benchmarks")
SMOKE_MODES = ["ddp_adamw", "ds_zero2", "zeroadamw_stage2", "zeroadamw_sib", "lomo"]


def _load_compare():
    spec = importlib.util.spec_from_file_location("bench_compare", os.path.join(BENCH, "compare.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("compare")
    modes = [m for m in SMOKE_MODES if m != "ds_zero2" or importlib.util.find_spec("deepspeed")]
    cmd = [sys.executable, os.path.join(BENCH, "compare.py"), "--smoke", "--modes", *modes, "--world-sizes", "1", "2",
           "--out-jsonl", str(out / "c.jsonl"), "--out-md", str(out / "c.md"), "--plots", str(out / "c"),
           "--kernel-json", str(out / "absent.json"), "--timeout", "300"]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=560)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    recs = [json.loads(line) for line in (out / "c.jsonl").read_text().splitlines()]
    return out, modes, recs


def _one(recs, mode, n, rank=0):
    rs = [r for r in recs if r["mode"] == mode and r["world_size"] == n and r["rank"] in (rank, None)]
    assert rs, (mode, n)
    return rs[0]


def test_compare_outputs_exist_and_every_row_is_there(smoke):
    out, modes, recs = smoke
    for f in ("c.jsonl", "c.md", "c_memory.png", "c_step_time.png"):
        assert (out / f).stat().st_size > 0, f
    png = (out / "c_memory.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    for n in (1, 2):
        for mode in modes:
            r = _one(recs, mode, n)
            if mode == "lomo" and n == 2:
                assert r["status"] == "not applicable" and r["reason"]
                continue
            assert r["status"] == "ok", r
            if n == 2:
                assert {x["rank"] for x in recs if x["mode"] == mode and x["world_size"] == 2} == {0, 1}
    md = (out / "c.md").read_text()
    assert "| zeroadamw stage 2 | 2 |" in md and "not applicable" in md
    assert "PASS" in md or "MISS" in md
    assert "Command: `python benchmarks/compare.py --smoke" in md and "Machine:" in md


def test_compare_numbers_are_sane(smoke):
    _, modes, recs = smoke
    ok = [r for r in recs if r["status"] == "ok"]
    params = ok[0]["params"]
    assert all(r["params"] == params for r in ok)
    for r in ok:
        assert r["step_ms_median"] > 0 and r["peak_growth_bytes"] > 0 and r["peak_bytes"] >= r["peak_growth_bytes"]
        assert math.isfinite(r["final_loss"])
    # same model, same tokens: the loss of the first step is the same in every mode (rank by rank)
    for n in (1, 2):
        for rank in range(n):
            first = [r["losses"][0] for r in ok if r["world_size"] == n and r["rank"] == rank]
            assert len(first) >= 3 and max(first) - min(first) <= 1e-5 * abs(first[0]), first
    adamw = 8 * params
    assert _one(recs, "ddp_adamw", 1)["state_bytes"] == adamw
    assert _one(recs, "ddp_adamw", 2)["state_bytes"] == adamw
    assert _one(recs, "lomo", 1)["state_bytes"] == 0
    for mode in ("zeroadamw_stage2", "zeroadamw_sib"):
        assert _one(recs, mode, 1)["state_bytes"] == adamw
        for rank in (0, 1):  # AdamW's / 2 up to padding: < N elements (8 bytes each) per bucket
            r = _one(recs, mode, 2, rank)
            assert 0 <= r["state_bytes"] - adamw / 2 < 8 * 2 * r["n_buckets"], r
    # collective bytes: DDP counted through its comm hook = ring all-reduce of every gradient = 2 (N-1)/N x 4 params
    ddp = _one(recs, "ddp_adamw", 2)
    assert ddp["comm_method"].startswith("counted")
    assert abs(ddp["comm_bytes_per_step"] - 4 * params) <= 0.01 * 4 * params
    z2 = _one(recs, "zeroadamw_stage2", 2)
    assert z2["comm_method"].startswith("counted") and z2["comm_bytes_per_step"] >= 0.99 * ddp["comm_bytes_per_step"]
    assert "all_gather" in z2["comm_detail"]
    if "ds_zero2" in modes:
        ds = _one(recs, "ds_zero2", 2)
        b = ds["state_breakdown"]  # the client's moments over the 1/N partition + DeepSpeed's fp32 partition
        assert abs(b["client_adamw_state"] - adamw / 2) <= 8 * 64 and abs(b["fp32_master_partitions"] - adamw / 4) <= 4 * 64
        assert ds["comm_method"].startswith("computed") and ds["comm_bytes_per_step"] > 0
        logged = ds["ds_comms_logged"]
        assert logged and logged["ops"], "DeepSpeed's comms logger recorded nothing"
        assert abs(logged["algorithmic_bytes"] - ds["comm_bytes_per_step"]) <= 0.05 * ds["comm_bytes_per_step"], (
            logged, ds["comm_detail"])


def test_missing_library_gives_a_row_with_the_reason(monkeypatch, tmp_path):
    compare = _load_compare()
    monkeypatch.setattr(compare.importlib.util, "find_spec", lambda name: None)
    rec = compare.launch("bnb_adamw8bit", 2, None, str(tmp_path))
    assert rec["status"] == "not runnable here" and "bitsandbytes is not installed" in rec["reason"]
    assert compare.launch("lomo", 4, None, str(tmp_path))["status"] == "not applicable"


def test_kernel_bandwidth_tiny(tmp_path):
    cmd = [sys.executable, os.path.join(BENCH, "kernel_bandwidth.py"), "--params-m", "0.05", "--trials", "3",
           "--warmup", "1", "--device", "cpu", "--json", str(tmp_path / "k.json"), "--md", str(tmp_path / "k.md")]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    res = json.loads((tmp_path / "k.json").read_text())
    assert res["params"]["flat"] == 50_000 and 0.8 * 50_000 <= res["params"]["llama"] <= 1.2 * 50_000
    for k, v in res["GBps"].items():
        assert math.isfinite(v) and v > 0, k
    assert res["bandwidth_GBps"]["used"] == max(res["bandwidth_GBps"]["copy"], res["bandwidth_GBps"]["triad"])
    assert {t["target"] for t in res["targets"]} == {"kernel_vs_torch_fused_flat", "kernel_vs_torch_fused_llama"}
    assert all(isinstance(t["pass"], bool) and ("x torch fused" in t["text"]) for t in res["targets"])
    md = (tmp_path / "k.md").read_text()
    assert "| zeroadamw fused | flat" in md and ("PASS" in md or "MISS" in md)
