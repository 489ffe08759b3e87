"""zeroadamw as DeepSpeed's client optimizer (real DeepSpeed, 2 gloo processes on CPU)."""

import pytest
import torch

import ds_workers
from distributed import run
from helpers import rel_err

import deepspeed  # noqa: F401,E402 - installed by `make setup` (pip install --no-build-isolation deepspeed)

pytestmark = [pytest.mark.dist, pytest.mark.filterwarnings("ignore")]


@pytest.mark.parametrize("stage", [1, 2])
def test_zero_stages_match_torch_adamw_as_client(stage):
    """DeepSpeed ZeRO-1/2 partitions; ShardedAdamW (detecting it) and client_optimizer's plain AdamW train exactly
    like torch.optim.AdamW as DeepSpeed's client (same kernel order: bit-identical)."""
    ref = run(ds_workers.ds_train, 2, "torch", stage, init=False, timeout=600)[0]
    for kind in ("sharded", "helper"):
        res = run(ds_workers.ds_train, 2, kind, stage, init=False, timeout=600)[0]
        assert res["wrapper"] == ref["wrapper"] == "DeepSpeedZeroOptimizer"
        if kind == "sharded":
            assert res["plain"] is True, "ShardedAdamW did not notice DeepSpeed's partitioning"
        for k, v in res["params"].items():
            assert torch.equal(v, ref["params"][k]), (kind, stage, k)


def test_int8_state_as_deepspeed_zero2_client():
    """ShardedAdamW(state_dtype="int8") handed to DeepSpeed ZeRO-2: it acts plain on DeepSpeed's flat fp32
    partitions, keeps 8-bit moments there, and trains like torch.optim.AdamW (to 8-bit precision)."""
    ref = run(ds_workers.ds_train, 2, "torch", 2, init=False, timeout=600)[0]
    res = run(ds_workers.ds_train, 2, "sharded_int8", 2, init=False, timeout=600)[0]
    assert res["plain"] is True and res["state_dtypes"] == ["torch.uint8"], res["state_dtypes"]
    worst = max(rel_err(v, ref["params"][k]) for k, v in res["params"].items())
    assert 0 < worst <= 2e-2, worst
    assert abs(res["losses"][-1] - ref["losses"][-1]) < 1e-2 * abs(ref["losses"][-1])


def test_stage0_shards_on_top_of_deepspeed_allreduce():
    ref = run(ds_workers.ds_train, 2, "torch", 0, init=False, timeout=600)[0]
    res = run(ds_workers.ds_train, 2, "helper", 0, init=False, timeout=600)[0]
    worst = max(rel_err(v, ref["params"][k]) for k, v in res["params"].items())
    assert worst <= 1e-6, worst


def test_bad_configs_are_refused():
    from zeroadamw.integrations.deepspeed import check_config, client_optimizer

    base = {"zero_optimization": {"stage": 2}, "zero_allow_untested_optimizer": True}
    with pytest.raises(ValueError, match="optimizer' block"):
        check_config({**base, "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}})
    with pytest.raises(ValueError, match="zero_allow_untested_optimizer"):
        check_config({"zero_optimization": {"stage": 1}})
    with pytest.raises(ValueError, match="zero_force_ds_cpu_optimizer"):
        check_config({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}},
                      "zero_allow_untested_optimizer": True})
    with pytest.raises(ValueError, match="do not apply"):
        client_optimizer([torch.nn.Parameter(torch.ones(2))], base, stage=2)
    import json
    import pathlib

    for f in sorted(pathlib.Path(__file__).parent.parent.joinpath("configs").glob("ds_zero*.json")):
        check_config(json.loads(f.read_text()))  # the shipped configs pass
