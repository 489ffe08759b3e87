"""Our optimizers under Accelerate's FSDP2 (configs/accelerate_fsdp2_cpu.yaml): a real ``accelerate launch`` of
2 CPU processes (gloo) running tests/acc_fsdp_script.py.

The optimizer is built on the plain model and ``accelerator.prepare(model, optimizer)`` swaps its params for the
``fully_shard`` DTensor shards (the path every Accelerate FSDP2 user takes). ShardedAdamW, SparseAdamW and
zeroadamw.AdamW must then train exactly like torch.optim.AdamW(fused=True) on the same batches, hold their state as
DTensors of the local shards, and resume exactly from ``accelerator.save_state`` / ``load_state`` (DCP,
SHARDED_STATE_DICT). Two launches (fp32, bf16 compute; 15-40 s each on 2 shared cores) feed every test.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("accelerate")
pytest.importorskip("transformers")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "accelerate_fsdp2_cpu.yaml")
SCRIPT = os.path.join(ROOT, "tests", "acc_fsdp_script.py")
STEPS, SAVE_AT, CLIP = 10, 5, 0.5
TOL = 1e-6  # relative (the CPU runs are in fact bit-identical: 0.0)
OURS = ["ShardedAdamW", "AdamW", "SparseAdamW"]
DTENSOR_STATE = ["exp_avg:DTensor", "exp_avg_sq:DTensor"]

pytestmark = [pytest.mark.dist, pytest.mark.slow, pytest.mark.filterwarnings("ignore::FutureWarning")]


@pytest.fixture(scope="module", params=["no", "bf16"], ids=["fp32", "bf16"])
def ranks(request, tmp_path_factory):
    """Both ranks' results of one ``accelerate launch`` of tests/acc_fsdp_script.py: the CPU config as shipped
    (fp32), and with ``--mixed_precision bf16`` as configs/accelerate_fsdp2.yaml has it (fp32 params and state,
    bf16 compute through FSDP2's MixedPrecisionPolicy)."""
    out = tmp_path_factory.mktemp(f"acc_fsdp2_{request.param}")
    accelerate = os.path.join(os.path.dirname(sys.executable), "accelerate")
    env = dict(os.environ, ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1")
    env.pop("DS_ACCELERATOR", None)
    cmd = [accelerate, "launch", "--config_file", CONFIG, "--num_processes", "2", "--main_process_port", "0",
           "--mixed_precision", request.param,
           SCRIPT, "--out", str(out), "--steps", str(STEPS), "--save_at", str(SAVE_AT), "--clip", str(CLIP),
           "--names", ",".join(OURS + ["ShardedAdamW_own_clip"]), "--resume", ",".join(OURS)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    res = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    for r in res:
        assert r["world_size"] == 2
        ref = r["runs"]["torch"]
        assert ref["param_dtypes"] == ["torch.float32"], ref  # fp32 params (masters) in both
        assert ref["compute_dtype"] == ("torch.bfloat16" if request.param == "bf16" else "None"), ref
    # the checkpoint is accelerate's FSDP2 one: DCP checkpoints of the model and of the optimizer,
    # one shard file per rank
    for name in OURS:
        for part in ("pytorch_model_fsdp_0", "optimizer_0"):
            files = set(os.listdir(out / f"ckpt_{name}" / part))
            assert {".metadata", "__0_0.distcp", "__1_0.distcp"} <= files, (name, part, files)
    return res


def _run(r, name):
    run = r["runs"][name]
    assert run.get("error") is None, f"{name} raised:\n{run['error']}"
    return run


def test_the_references_ran_on_fsdp2_with_clipping_active(ranks):
    for r in ranks:
        for ref in ("torch", "torch_nn_clip"):
            run = _run(r, ref)
            assert run["param_types"] == ["DTensor"], (ref, "prepare() did not swap in fully_shard's DTensors")
            assert run["state_kinds"] == DTENSOR_STATE, ref
            assert len(run["norms"]) == STEPS and min(run["norms"]) > CLIP, (ref, run["norms"])  # always clipped


@pytest.mark.parametrize("name", OURS)
def test_equals_torch_adamw_after_accelerate_prepare(ranks, name):
    """accelerator.prepare swapped the params for DTensors; accelerator.clip_grad_norm_ on both; every step's local
    param shards and the final local state shards equal torch.optim.AdamW(fused=True)'s."""
    for r in ranks:
        run = _run(r, name)
        assert run["optimizer_type"] == name and run["param_types"] == ["DTensor"]
        assert len(run["param_err"]) == STEPS and max(run["param_err"]) <= TOL, (name, run["param_err"])
        assert run["state_err"] <= TOL, (name, run["state_err"])
        assert run["state_kinds"] == DTENSOR_STATE, (name, "state held as DTensors, as torch's is under FSDP2")
        assert run["norms"] == pytest.approx(run["ref_norms"], rel=TOL)  # accelerator.clip_grad_norm_'s
        if name != "AdamW":
            assert run["fsdp_mode"] is True, (name, "did not switch to FSDP2 mode after the swap")
            # it sees the gradients accelerator.clip_grad_norm_ already clipped to CLIP (over every rank's shards)
            assert run["our_norms"] == pytest.approx([CLIP] * STEPS, rel=1e-5)


def test_sharded_adamw_clips_by_itself_under_fsdp2(ranks):
    """ShardedAdamW(max_grad_norm=...) without accelerator.clip_grad_norm_: its global norm over the DTensor grads
    and its clipping equal torch.nn.utils.clip_grad_norm_ (same param order) + torch's AdamW."""
    for r in ranks:
        run = _run(r, "ShardedAdamW_own_clip")
        assert run["fsdp_mode"] is True and run["state_kinds"] == DTENSOR_STATE
        assert max(run["param_err"]) <= TOL and run["state_err"] <= TOL, (run["param_err"], run["state_err"])
        assert run["our_norms"] == pytest.approx(run["ref_norms"], rel=TOL)  # the pre-clip global norm


@pytest.mark.parametrize("name", OURS)
def test_save_state_load_state_resumes_exactly(ranks, name):
    """save_state after SAVE_AT steps (DCP), fresh copies (another init) + load_state, the remaining steps: the
    loaded params and state are the saved ones and the run ends where the uninterrupted one ended."""
    for r in ranks:
        run = _run(r, f"resume_{name}")
        assert run["loaded_param_err"] <= TOL, run  # the model shards came back
        # (Accelerate's prepare() round-trips the fresh optimizer's empty state dict before swapping in FSDP2's
        # shards: that must leave the state unmade, or torch's get_optimizer_state_dict skips its init step)
        assert run["loaded_state_entries"] == run["saved_state_entries"] > 0, run
        assert run["loaded_state_err"] <= TOL, run
        assert len(run["param_err"]) == STEPS - SAVE_AT and max(run["param_err"]) <= TOL, run["param_err"]
        assert run["state_err"] <= TOL and run["state_kinds"] == DTENSOR_STATE, run
