"""zeroadamw under a plain Accelerate loop: prepare, accumulate, clip_grad_norm_, save_state / load_state."""

import tempfile

import pytest
import torch

import acc_workers
from distributed import run

pytestmark = [pytest.mark.dist, pytest.mark.filterwarnings("ignore::FutureWarning")]


def test_accelerate_loop_equals_the_optimizer_used_directly():
    """accelerator.accumulate -> our no_sync(), clip_grad_norm_ -> our exact global clipping, no DDP wrapping:
    the Accelerate loop is bit-identical to driving ShardedAdamW by hand, and the returned norm is ours."""
    with tempfile.TemporaryDirectory() as root:
        res = run(acc_workers.both, 2, root, 5, init=False, timeout=600)
    for r in res:
        acc, manual = r["acc"], r["manual"]
        assert acc["model_type"] == "LlamaForCausalLM"
        for k, v in acc["params"].items():
            assert torch.equal(v, manual["params"][k]), k
        assert acc["norms"] == pytest.approx(manual["norms"], rel=1e-6)
        assert max(acc["norms"]) > 0.5  # clipping was active


def test_save_state_and_load_state_resume_exactly():
    with tempfile.TemporaryDirectory() as root:
        full = run(acc_workers.accelerate_loop, 2, root, 6, init=False, timeout=600)[0]
        run(acc_workers.accelerate_save, 2, root, 3, init=False, timeout=600)
        resumed = run(acc_workers.accelerate_loop, 2, root, 6, 3, init=False, timeout=600)[0]
    for k, v in resumed["params"].items():
        assert torch.equal(v, full["params"][k]), k
