"""Multi-node training on one machine: two ``torchrun`` launchers (``--nnodes 2 --nproc_per_node 2``, c10d
rendezvous on 127.0.0.1) play two nodes of two ranks each -- LOCAL_WORLD_SIZE=2, so ``--mesh hierarchical``
builds a 2 x 2 ("replicate", "shard") mesh whose shard rows are the two "nodes" -- and run
launch/finetune_llama.py (the tiny LLaMA of configs/llama-tiny.json, gloo on CPU).

Run 1 trains 6 steps (gradient accumulation 2) and checkpoints at steps 3 and 6; run 2 resumes from
checkpoint-3 and trains steps 4-6 again. Checked: the loss is finite and falls; the resumed run continues at
step 4 and reproduces run 1's steps 4-6 (losses and final params, bit for bit); one step's counted bytes per
mesh dimension (comm_bytes.json) equal zeroadamw.estimate.comm_bytes' on every rank; the 4 ranks' final params
are identical and equal the saved checkpoint.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
import types
import uuid

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCHER = os.path.join(ROOT, "launch", "finetune_llama.py")
TORCHRUN = os.path.join(os.path.dirname(sys.executable), "torchrun")

# small and fast: 2 x 32 tokens per micro-batch, 2 micro-batches per step, ~1.2M-element buckets
TRAIN = ["--mesh", "hierarchical", "--per_device_train_batch_size", "2", "--block_size", "32",
         "--gradient_accumulation_steps", "2", "--logging_steps", "1", "--learning_rate", "2e-3",
         "--bucket_size", "262144", "--max_steps", "6", "--save_steps", "3", "--validation_fraction", "0",
         "--report_to", "none", "--disable_tqdm", "true"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _kill(procs) -> None:
    """End the launchers we started, and their workers: each launcher leads its own process group."""
    for p in procs:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + 10
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait()


def run_two_nodes(args: list[str], logdir, timeout: float = 240.0) -> list[str]:
    """Start two torchrun launchers as the two nodes of one job, wait for both; return each node's output. On a
    failure, a hang (``timeout``) or an exception, both process groups are killed."""
    port, rdzv_id = _free_port(), uuid.uuid4().hex[:8]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("DS_ACCELERATOR", None)  # the launcher sets it for a CPU run
    procs, logs = [], []
    try:
        for node in (0, 1):
            log = open(os.path.join(logdir, f"node{node}.log"), "w")
            logs.append(log)
            cmd = [TORCHRUN, "--nnodes", "2", "--nproc_per_node", "2", "--node_rank", str(node),
                   "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", rdzv_id,
                   "--max-restarts", "0", LAUNCHER, *args]
            procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                          start_new_session=True))
        deadline = time.monotonic() + timeout
        failed_at = None
        while any(p.poll() is None for p in procs):
            now = time.monotonic()
            if failed_at is None and any(p.poll() not in (None, 0) for p in procs):
                failed_at = now  # one node failed: give the other a moment to notice, then end it
            if now > deadline or (failed_at is not None and now > failed_at + 20):
                break
            time.sleep(0.5)
        timed_out = any(p.poll() is None for p in procs)
    finally:
        _kill(procs)
        for log in logs:
            log.close()
    outs = [open(os.path.join(logdir, f"node{n}.log")).read() for n in (0, 1)]
    codes = [p.returncode for p in procs]
    assert not timed_out and codes == [0, 0], (f"return codes {codes}{' (timed out)' if timed_out else ''}\n"
                                               + "\n".join(f"--- node {n}:\n{o[-4000:]}" for n, o in enumerate(outs)))
    return outs


def _logged_steps(out: str) -> list[dict]:
    """The training-step logs a node printed (Trainer prints them on each node's local rank 0)."""
    return [json.loads(x.replace("'", '"')) for x in out.splitlines() if x.startswith("{'loss'")]


def params_sha256(named) -> str:
    """The launcher's digest of a model's params (name, then raw bytes, in name order)."""
    h = hashlib.sha256()
    for name, t in sorted(named):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _history(out_dir) -> list[dict]:
    return [json.loads(x) for x in (out_dir / "log_history.jsonl").read_text().splitlines()]


def _check_comm(report: dict, step: int) -> None:
    """One steady-state step: every rank's counted bytes per mesh dimension equal the model's, exactly."""
    from zeroadamw import estimate

    assert report["step"] == step and report["layout"] == "hierarchical", report
    assert report["mesh"] == {"replicate": 2, "shard": 2}
    # HF Trainer runs the first micro-batch under the optimizer's no_sync(): stage 2 reduces once per step
    assert report["micro_batches"] == 2 and report["reduced_backwards"] == 1
    model = estimate.comm_bytes([tuple(b) for b in report["buckets"]], shard=2, replicate=2, micro_batches=1)
    assert report["model"] == model and model["replicate"]["all_reduce"] > 0
    assert len(report["ranks"]) == 4 and report["match"], report["mismatches"]
    for r in report["ranks"]:
        counted = {dim: {op: v["bytes"] for op, v in ops.items()}
                   for dim, ops in r["counted"].items() if dim != "world"}
        assert counted == model, (r["rank"], counted, model)
        assert set(r["counted"]["world"]) <= {"control"}  # the agreement over all 4 ranks: one small all-reduce
        n = len(report["buckets"])
        assert r["counted"]["shard"]["reduce_scatter"]["calls"] == n == r["counted"]["replicate"]["all_reduce"]["calls"]
    # the shard rows are the nodes: a node's two ranks share a replicate index and differ in the shard index
    rows = {(r["node"], r["coords"]["replicate"]) for r in report["ranks"]}
    assert len(rows) == 2 and len({node for node, _ in rows}) == 2, report["ranks"]
    assert sorted((r["node"], r["coords"]["shard"]) for r in report["ranks"]) == [(0, 0), (0, 1), (1, 0), (1, 1)]


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_two_node_torchrun_hierarchical_mesh_train_and_resume(tmp_path):
    from safetensors.torch import load_file

    # run 1: 6 steps, checkpoints at 3 and 6
    out1 = tmp_path / "run1"
    (tmp_path / "log1").mkdir()
    nodes1 = run_two_nodes(TRAIN + ["--output_dir", str(out1)], tmp_path / "log1")
    log1 = "".join(nodes1)
    assert [len(_logged_steps(o)) for o in nodes1] == [6, 6]  # both nodes trained 6 steps
    assert "training on 4 process(es) (cpu, gloo), ShardedAdamW stage 2 over a 2 x 2 (replicate x shard) mesh" in log1
    assert "all 4 ranks: counted == model" in log1, log1[-3000:]
    h1 = _history(out1)
    losses = {h["step"]: h["loss"] for h in h1 if "loss" in h}
    assert sorted(losses) == [1, 2, 3, 4, 5, 6] and all(math.isfinite(v) for v in losses.values())
    assert losses[6] < losses[1] - 0.5, losses  # byte-level LM from ln(256) = 5.55: falls fast
    rep1 = json.loads((out1 / "comm_bytes.json").read_text())
    _check_comm(rep1, 6)
    digests1 = rep1["params_sha256"]
    assert len(digests1) == 4 and len(set(digests1)) == 1, digests1  # the 4 ranks' final params: identical
    ckpt6 = load_file(str(out1 / "checkpoint-6" / "model.safetensors"))
    assert params_sha256(ckpt6.items()) == digests1[0]  # ... and what was saved
    for d in ("checkpoint-3", "checkpoint-6"):
        files = set(os.listdir(out1 / d / "zeroadamw_optimizer"))  # the optimizer, saved by every rank
        assert {"zeroadamw.json", "__0_0.distcp", "__1_0.distcp", "__2_0.distcp", "__3_0.distcp"} <= files, files

    # run 2: resume from checkpoint-3 and train steps 4-6 again
    out2 = tmp_path / "run2"
    (tmp_path / "log2").mkdir()
    nodes2 = run_two_nodes(TRAIN + ["--output_dir", str(out2), "--resume_from_checkpoint", str(out1 / "checkpoint-3")],
                           tmp_path / "log2")
    log2 = "".join(nodes2)
    assert "all 4 ranks: counted == model" in log2, log2[-3000:]
    assert [len(_logged_steps(o)) for o in nodes2] == [3, 3], log2[-3000:]  # each node trained steps 4, 5, 6
    h2 = _history(out2)
    resumed = {h["step"]: h["loss"] for h in h2 if "loss" in h}
    assert sorted(resumed) == [1, 2, 3, 4, 5, 6]  # 1-3 from checkpoint-3's trainer_state, then 4-6 trained
    for s in (4, 5, 6):  # the same data, params and optimizer state as run 1 at these steps
        assert resumed[s] == pytest.approx(losses[s], rel=1e-6, abs=1e-6), (s, resumed[s], losses[s])
    rep2 = json.loads((out2 / "comm_bytes.json").read_text())
    _check_comm(rep2, 6)
    assert rep2["final_step"] == 6 and len(set(rep2["params_sha256"])) == 1
    assert rep2["params_sha256"] == digests1, "the resumed run did not reproduce the uninterrupted one"


def _launcher_module(monkeypatch):
    # the launcher sets ACCELERATE_USE_CPU / DS_ACCELERATOR on a CPU machine at import: keep them out of this
    # test process (monkeypatch restores them)
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    spec = importlib.util.spec_from_file_location("finetune_llama_for_tests", LAUNCHER)
    mod = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, mod)  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def test_mesh_flags_are_checked(monkeypatch):
    mod = _launcher_module(monkeypatch)
    targs = types.SimpleNamespace(deepspeed=None, world_size=1, device=torch.device("cpu"))
    assert mod.build_mesh(mod.ZeroArguments(), targs) is None  # --mesh flat: no mesh
    with pytest.raises(SystemExit, match="--shard_size is an option of --mesh hierarchical"):
        mod.build_mesh(mod.ZeroArguments(shard_size=2), targs)
    with pytest.raises(SystemExit, match="--mesh hierarchical is an option of --optimizer zeroadamw"):
        mod.build_mesh(mod.ZeroArguments(mesh="hierarchical", optimizer="adamw_torch"), targs)
    with pytest.raises(SystemExit, match="does not apply under DeepSpeed"):
        mod.build_mesh(mod.ZeroArguments(mesh="hierarchical"),
                       types.SimpleNamespace(deepspeed="configs/ds_zero2.json", world_size=4))
    with pytest.raises(SystemExit, match="needs a distributed launch"):
        mod.build_mesh(mod.ZeroArguments(mesh="hierarchical"), targs)
    with pytest.raises(SystemExit, match="must be flat or hierarchical"):
        mod.build_mesh(mod.ZeroArguments(mesh="2d"), targs)
    step_in_backward = types.SimpleNamespace(step_in_backward=True)
    assert mod.reduced_backwards(step_in_backward, 4) == 4
    assert mod.reduced_backwards(types.SimpleNamespace(step_in_backward=False), 4) == 1
