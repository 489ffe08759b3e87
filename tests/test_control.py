"""The control plane (zeroadamw.control): device choice, strict mode, host reads per phase, error agreement,
reentrant checkpointing with fused step in backward, the fill order over the world group."""

import pytest
import torch

import control_workers
from distributed import run
from zeroadamw.control import DeviceError, check_collective_device, control_device, group_device_types


class _Group:
    """Only what the device decision reads from a ProcessGroup: the device types it has backends for."""

    def __init__(self, *types):
        self._device_types = [torch.device(t) for t in types]


def test_control_device_follows_the_params_when_the_group_takes_them():
    assert control_device(_Group("cpu", "cuda"), torch.device("cuda", 1)) == torch.device("cuda", 1)
    assert control_device(_Group("cuda"), torch.device("cuda", 0)) == torch.device("cuda", 0)
    assert control_device(_Group("cpu"), torch.device("cpu")) == torch.device("cpu")


def test_control_device_cuda_params_on_a_cpu_only_group_use_the_cpu():
    # "cpu:gloo" with a CUDA model: control tensors go to the CPU (never to a device the group cannot take)
    assert control_device(_Group("cpu"), torch.device("cuda", 0)) == torch.device("cpu")


def test_control_device_refuses_a_group_without_the_params_device():
    # init_process_group() without a backend on a GPU machine binds only cuda:nccl; CPU params cannot use it
    with pytest.raises(ValueError, match="init_process_group\\('cpu:gloo,cuda:nccl'\\)"):
        control_device(_Group("cuda"), torch.device("cpu"))


def test_strict_mode_names_a_tensor_the_group_cannot_take():
    with pytest.raises(DeviceError, match="cpu tensor was given to a process group whose backends take \\['cuda'\\]"):
        check_collective_device(torch.zeros(2), _Group("cuda"), "all_reduce")
    check_collective_device(torch.zeros(2), _Group("cpu", "cuda"), "all_reduce")  # fine


def test_strict_mode_is_on_in_the_suite():
    import os

    from zeroadamw.control import strict_enabled

    assert os.environ.get("ZEROADAMW_STRICT_DEVICE") == "1" and strict_enabled()


def test_group_device_types_reads_the_group():
    assert group_device_types(_Group("cpu")) == {"cpu"}


@pytest.mark.dist
@pytest.mark.parametrize("mode", ["stage2", "sib", "sib_clip", "sparse"])
@pytest.mark.parametrize("layers,per_bucket", [(8, 2), (16, 1)])  # 4 + head and 16 + head buckets
def test_no_host_reads_in_backward_and_at_most_two_per_step(mode, layers, per_bucket):
    cfg = dict(layers=layers, layers_per_bucket=per_bucket, sib=mode.startswith("sib"),
               clip=1.0 if mode == "sib_clip" else None, sparse=mode == "sparse", steps=5)
    for r in run(control_workers.host_reads, 2, cfg, timeout=240):
        assert r["buckets"] >= (layers // per_bucket), r["buckets"]
        steady_bw, steady_step = r["backward"][2:], r["step"][2:]
        assert all(n == 0 for n in steady_bw), (steady_bw, r["where"][2:])
        assert all(n <= 2 for n in steady_step), (steady_step, r["where"][2:])
        assert max(r["step"]) <= 2, (r["step"], r["where"])  # the first step too (layout + order + stats)


@pytest.mark.dist
@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("clip", [None, 1.0])
def test_fused_step_in_backward_with_reentrant_checkpointing_trains_every_param(world, clip):
    for r in run(control_workers.reentrant, world, dict(clip=clip, layers_per_bucket=1), timeout=240):
        assert all(r["moved"]), r["moved"]
        assert r["worst"] <= 1e-6, r


@pytest.mark.dist
def test_fill_order_is_agreed_over_the_world_group_not_an_expert_group():
    res = run(control_workers.fill_order_over_world, 2, {}, timeout=120)
    orders = res[0]["orders"]
    assert orders[0] == orders[1], orders
    for r in res:
        assert r["worst"] <= 1e-6, r


@pytest.mark.dist
@pytest.mark.parametrize("stage", [1, 2])
def test_grad_scaler_attribute_protocol_at_two_ranks(stage):
    res = run(control_workers.grad_scaler_attribute_protocol, 2, dict(stage=stage), timeout=180)
    for r in res:
        assert r["worst"] == 0.0, r
        assert r["skipped"] >= 1, r  # 2**22 overflows fp16 at first: both protocols skip and back off together


@pytest.mark.dist
def test_grad_scaler_attribute_protocol_without_attach_is_refused_on_every_rank():
    with pytest.raises(RuntimeError) as e:
        run(control_workers.grad_scaler_attribute_protocol, 2, dict(attach=False), timeout=120)
    assert str(e.value).count("attach_grad_scaler(scaler)") == 2  # both ranks raised, neither hung


@pytest.mark.dist
@pytest.mark.parametrize("backend", [None, "gloo", "cpu:gloo"])
def test_process_group_spellings_train_like_torch(backend):
    res = run(control_workers.backend_spelling, 2, dict(backend=backend), timeout=180, init=False)
    assert res[0]["backend"] == {None: "undefined", "gloo": "gloo", "cpu:gloo": "cpu:gloo"}[backend]
    for r in res:
        assert all(w <= 1e-6 for w in r["worst"].values()), r


def test_fused_step_in_backward_then_add_param_group_matches_torch():
    """The per-group gradient-norm accumulator of fused step in backward grows with add_param_group."""
    torch.manual_seed(0)
    a, b = torch.nn.Linear(4, 4), torch.nn.Linear(4, 2)
    ra, rb = torch.nn.Linear(4, 4), torch.nn.Linear(4, 2)
    ra.load_state_dict(a.state_dict())
    rb.load_state_dict(b.state_dict())
    from zeroadamw import ShardedAdamW

    opt = ShardedAdamW(a.parameters(), lr=1e-2, step_in_backward=True)
    ref = torch.optim.AdamW(ra.parameters(), lr=1e-2)
    for step in range(4):
        if step == 2:
            opt.add_param_group({"params": list(b.parameters())})
            ref.add_param_group({"params": list(rb.parameters())})
        x = torch.randn(3, 4, generator=torch.Generator().manual_seed(step))
        for m1, m2, o in ((a, b, opt), (ra, rb, ref)):
            (m2(m1(x)).square().mean()).backward()
            o.step()
            o.zero_grad()
        assert len(opt.group_grad_norms) == len(opt.param_groups)
    for p, q in zip(list(a.parameters()) + list(b.parameters()), list(ra.parameters()) + list(rb.parameters())):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
