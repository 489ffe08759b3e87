"""zeroadamw.checkpoint: reshard N -> M, bit-exact resume, atomic saves, validation, export, tensor-only payloads."""

import copy
import json
import os
import pickle
import subprocess
import sys
import tempfile
import textwrap

import pytest
import torch
from torch import nn

import ckpt_expert_workers
import ckpt_workers
from distributed import run
from helpers import MLP, max_state_err, mlp_batch, param_groups, rel_err
from zeroadamw import ShardedAdamW
from zeroadamw import checkpoint as ck

K, J = 4, 3  # steps before the checkpoint, steps after it


def assert_state_equal(a, b):
    assert set(a["state"]) == set(b["state"])
    for k, st in b["state"].items():
        for name, t in st.items():
            assert torch.equal(a["state"][k][name], t), (k, name)


@pytest.fixture(scope="module")
def reshard_runs():
    """Save at N = 1..4 (each run also continues: the never-stopped reference), then load every checkpoint at
    M = 1..4 and continue."""
    with tempfile.TemporaryDirectory() as root:
        saved = {n: run(ckpt_workers.save_then_continue, n, root, K, J)[0] for n in (1, 2, 3, 4)}
        sources = [f"N{n}" for n in (1, 2, 3, 4)]
        loaded = {m: run(ckpt_workers.load_and_continue, m, root, sources, K, J)[0] for m in (1, 2, 3, 4)}
        yield saved, loaded


@pytest.mark.dist
@pytest.mark.slow
def test_reshard_matrix(reshard_runs):
    saved, loaded = reshard_runs
    for m, per_source in loaded.items():
        for src, res in per_source.items():
            n = int(src[1:])
            ref = saved[n]
            # the load itself is exact at any M: params, every moment, master and step
            for p, q in zip(res["loaded"]["params"], ref["at_save"]["params"]):
                assert torch.equal(p, q), (n, m)
            assert_state_equal(res["loaded"]["optim"], ref["at_save"]["optim"])
            assert res["loaded"]["optim"]["param_groups"] == ref["at_save"]["optim"]["param_groups"]
            # continuing matches the run that never stopped: exactly at the same N, to rounding elsewhere
            for p, q in zip(res["final"]["params"], ref["final"]["params"]):
                if m == n:
                    assert torch.equal(p, q), f"resume at the same N={n} is not bit-exact"
                else:
                    assert rel_err(p, q) <= 1e-5, (n, m, rel_err(p, q))
            if m == n:
                assert_state_equal(res["final"]["optim"], ref["final"]["optim"])
            else:
                assert max_state_err(res["final"]["optim"], ref["final"]["optim"]) <= 1e-5


@pytest.mark.dist
def test_bf16_master_resume_is_bit_exact():
    with tempfile.TemporaryDirectory() as root:
        ref = run(ckpt_workers.save_then_continue, 2, root, K, J, "bfloat16")[0]
        res = run(ckpt_workers.load_and_continue, 2, root, ["N2"], K, J, "bfloat16")[0]["N2"]
    assert all(torch.equal(p, q) for p, q in zip(res["final"]["params"], ref["final"]["params"]))
    assert_state_equal(res["final"]["optim"], ref["final"]["optim"])
    assert any("master" in st for st in ref["final"]["optim"]["state"].values())


@pytest.mark.dist
def test_other_bucket_size_loads():
    with tempfile.TemporaryDirectory() as root:
        ref = run(ckpt_workers.save_then_continue, 2, root, K, J)[0]
        res = run(ckpt_workers.load_and_continue, 2, root, ["N2"], K, J, "float32", 777)[0]["N2"]
    assert_state_equal(res["loaded"]["optim"], ref["at_save"]["optim"])
    assert all(rel_err(p, q) <= 1e-5 for p, q in zip(res["final"]["params"], ref["final"]["params"]))


@pytest.mark.dist
def test_crash_while_saving_keeps_the_previous_checkpoint():
    with tempfile.TemporaryDirectory() as root:
        with pytest.raises((RuntimeError, TimeoutError)):
            run(ckpt_workers.crash_while_saving, 2, root, timeout=120)
        leftovers = [f for f in os.listdir(root) if f.startswith(".ckpt.tmp-")]
        assert leftovers, "the interrupted save should have left its temporary directory"
        with pytest.raises(ck.CheckpointError, match="not a complete"):
            ck.load(os.path.join(root, leftovers[0]), model=ckpt_workers.build()[0])
        assert all(run(ckpt_workers.load_after_crash, 2, root))
        # the next successful save cleans the debris up
        model, opt, sched = ckpt_workers.build()
        ck.save(os.path.join(root, "ckpt"), model=model, optimizer=opt)
        assert not [f for f in os.listdir(root) if f.startswith(".ckpt.")]


# ------------------------------------------------------------------------------------ single process
def trained_mlp(steps=5, opt_cls=ShardedAdamW, **kw):
    torch.manual_seed(0)
    model = MLP()
    opt = opt_cls(param_groups(model), **kw)
    for s in range(steps):
        model.loss(mlp_batch(s, 0)).backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def continue_training(model, opt, steps):
    for s in steps:
        model.loss(mlp_batch(s, 0)).backward()
        opt.step()
        opt.zero_grad()


def test_one_process_without_torch_distributed(tmp_path):
    model, opt = trained_mlp(bucket_size=64)
    ck.save(tmp_path / "c", model=model, optimizer=opt, extra={"epoch": 1, "note": "hi", "t": torch.arange(3)})
    model2, opt2 = trained_mlp(steps=1, bucket_size=40)
    extra = ck.load(tmp_path / "c", model=model2, optimizer=opt2)
    assert extra["epoch"] == 1 and extra["note"] == "hi" and torch.equal(extra["t"], torch.arange(3))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), model2.parameters()))
    assert_state_equal(opt2.state_dict(), opt.state_dict())
    continue_training(model, opt, range(5, 10))
    continue_training(model2, opt2, range(5, 10))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), model2.parameters()))


def test_export_consolidated_round_trips_through_torch_adamw(tmp_path):
    """ours -> export -> torch.optim.AdamW continues exactly like ours; torch AdamW -> checkpoint -> ours too."""
    model, opt = trained_mlp(impl="reference")
    ck.save(tmp_path / "c", model=model, optimizer=opt)
    out = ck.export_consolidated(tmp_path / "c", tmp_path / "out")
    sd = torch.load(out["optimizer"], weights_only=True)
    assert_state_equal(sd, opt.state_dict())
    from safetensors.torch import load_file

    weights = load_file(out["model"])
    twin = MLP()
    twin.load_state_dict(weights)
    torch_opt = torch.optim.AdamW(param_groups(twin), foreach=False)
    torch_opt.load_state_dict(sd)
    continue_training(model, opt, range(5, 10))
    continue_training(twin, torch_opt, range(5, 10))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), twin.parameters()))
    # and back: a torch AdamW checkpointed with zeroadamw.checkpoint loads into ShardedAdamW
    ck.save(tmp_path / "t", model=twin, optimizer=torch_opt)
    back = MLP()
    ours = ShardedAdamW(param_groups(back), impl="reference", bucket_size=50)
    ck.load(tmp_path / "t", model=back, optimizer=ours)
    assert_state_equal(ours.state_dict(), torch_opt.state_dict())
    continue_training(back, ours, range(10, 14))
    continue_training(twin, torch_opt, range(10, 14))
    assert all(torch.equal(p, q) for p, q in zip(back.parameters(), twin.parameters()))


def test_bf16_export_keeps_master(tmp_path):
    torch.manual_seed(0)
    model = MLP().to(torch.bfloat16)
    opt = ShardedAdamW(model.parameters())
    for s in range(3):
        model.loss(mlp_batch(s, 0, dtype=torch.bfloat16)).backward()
        opt.step()
        opt.zero_grad()
    ck.save(tmp_path / "c", model=model, optimizer=opt)
    sd = torch.load(ck.export_consolidated(tmp_path / "c", tmp_path / "o")["optimizer"], weights_only=True)
    assert_state_equal(sd, opt.state_dict())
    assert all(st["master"].dtype == torch.float32 for st in sd["state"].values())


def test_payloads_are_tensors_and_json(tmp_path):
    """Every item DCP wrote loads with weights_only=True, DCP's metadata has no BYTE_IO entries (no pickled
    objects of ours), and our description is plain JSON."""
    model, opt = trained_mlp()
    sched = torch.optim.lr_scheduler.StepLR(opt, 2)
    ck.save(tmp_path / "c", model=model, optimizer=opt, scheduler=sched, extra={"a": [1, 2.5, None]})
    d = tmp_path / "c"
    with open(d / ".metadata", "rb") as f:
        md = pickle.load(f)  # DCP's own metadata file, DCP's business; we only inspect it
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    assert not [k for k, v in md.state_dict_metadata.items() if isinstance(v, BytesStorageMetadata)]
    n = 0
    for fqn, info in md.storage_data.items():
        with open(d / info.relative_path, "rb") as f:
            f.seek(info.offset)
            blob = f.read(info.length)
        import io

        t = torch.load(io.BytesIO(blob), weights_only=True)
        assert isinstance(t, torch.Tensor)
        n += 1
    assert n > 20
    meta = json.loads((d / "zeroadamw.json").read_text())
    assert meta["optimizer"]["param_groups"][0]["params"][0] == "fc1.weight"
    assert meta["extra"] == {"a": [1, 2.5, None]}


def test_damaged_checkpoints_are_refused_by_name(tmp_path):
    model, opt = trained_mlp()
    ck.save(tmp_path / "c", model=model, optimizer=opt)
    shard = next(f for f in os.listdir(tmp_path / "c") if f.endswith(".distcp"))
    before = [p.detach().clone() for p in model.parameters()]

    def fresh():
        torch.manual_seed(5)
        m = MLP()
        return m, ShardedAdamW(param_groups(m))

    # corrupt: flip one byte in the middle of the payload
    bad = tmp_path / "corrupt"
    import shutil

    shutil.copytree(tmp_path / "c", bad)
    data = bytearray((bad / shard).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (bad / shard).write_bytes(bytes(data))
    m, o = fresh()
    untouched = [p.detach().clone() for p in m.parameters()]
    with pytest.raises(ck.CheckpointError, match=f"{shard}: CRC-32 mismatch"):
        ck.load(bad, model=m, optimizer=o)
    assert all(torch.equal(p, q) for p, q in zip(m.parameters(), untouched)), "a refused load changed weights"
    # truncated
    trunc = tmp_path / "trunc"
    shutil.copytree(tmp_path / "c", trunc)
    (trunc / shard).write_bytes((trunc / shard).read_bytes()[:100])
    with pytest.raises(ck.CheckpointError, match="truncated"):
        ck.load(trunc, model=fresh()[0], optimizer=None)
    # missing shard
    miss = tmp_path / "miss"
    shutil.copytree(tmp_path / "c", miss)
    os.remove(miss / shard)
    with pytest.raises(ck.CheckpointError, match=f"{shard}: missing"):
        ck.load(miss, model=fresh()[0])
    # not ours / incomplete
    with pytest.raises(ck.CheckpointError, match="no such checkpoint"):
        ck.load(tmp_path / "nope", model=fresh()[0])
    os.remove(miss / "zeroadamw.json")
    with pytest.raises(ck.CheckpointError, match="not a complete"):
        ck.load(miss, model=fresh()[0])
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


def test_wrong_model_or_groups_are_refused(tmp_path):
    model, opt = trained_mlp()
    ck.save(tmp_path / "c", model=model, optimizer=opt)
    other = nn.Sequential(nn.Linear(16, 9), nn.Linear(9, 7))
    with pytest.raises(ck.CheckpointError, match="tensors differ"):
        ck.load(tmp_path / "c", model=other)
    wide = MLP(d_hidden=40)
    with pytest.raises(ck.CheckpointError, match="shape"):
        ck.load(tmp_path / "c", model=wide)
    torch.manual_seed(0)
    same = MLP()
    one_group = ShardedAdamW(same.parameters())
    with pytest.raises(ck.CheckpointError, match="param groups"):
        ck.load(tmp_path / "c", model=same, optimizer=one_group)
    ck.save(tmp_path / "m", model=model)
    with pytest.raises(ck.CheckpointError, match="no optimizer state"):
        ck.load(tmp_path / "m", model=same, optimizer=ShardedAdamW(param_groups(same)))
    with pytest.raises(ValueError, match="needs model="):
        ck.save(tmp_path / "x", optimizer=opt)


def test_resuming_the_model_without_the_optimizer_warns_once(tmp_path, recwarn):
    model, opt = trained_mlp()
    ck.save(tmp_path / "c", model=model, optimizer=opt)
    torch.manual_seed(1)
    m2 = MLP()
    ck.load(tmp_path / "c", model=m2)  # optimizer forgotten
    fresh = ShardedAdamW(param_groups(m2))
    m2.loss(mlp_batch(9, 0)).backward()
    with pytest.warns(UserWarning, match="FRESH state"):
        fresh.step()
    fresh.zero_grad()
    m2.loss(mlp_batch(10, 0)).backward()
    fresh.step()
    assert not [w for w in recwarn if "FRESH" in str(w.message)], "warned more than once"
    # loading both: no warning
    m3 = MLP()
    o3 = ShardedAdamW(param_groups(m3))
    ck.load(tmp_path / "c", model=m3, optimizer=o3)
    m3.loss(mlp_batch(9, 0)).backward()
    o3.step()
    assert not [w for w in recwarn if "FRESH" in str(w.message)]


def test_overwrite_is_atomic_and_leaves_no_debris(tmp_path):
    model, opt = trained_mlp()
    ck.save(tmp_path / "c", model=model, optimizer=opt, extra={"v": 1})
    continue_training(model, opt, range(5, 7))
    ck.save(tmp_path / "c", model=model, optimizer=opt, extra={"v": 2})
    assert sorted(os.listdir(tmp_path)) == ["c"]
    m2, o2 = trained_mlp(steps=1)
    assert ck.load(tmp_path / "c", model=m2, optimizer=o2) == {"v": 2}
    # an interrupted swap (old moved aside, new not yet in place) is repaired on the next load
    os.rename(tmp_path / "c", tmp_path / ".c.old-123")
    with pytest.warns(UserWarning, match="recovered"):
        assert ck.load(tmp_path / "c", model=m2, optimizer=o2) == {"v": 2}


EXPORT_MEMORY = textwrap.dedent(
    """
    import os, sys, json, torch
    from zeroadamw import ShardedAdamW, checkpoint as ck
    from zeroadamw.memory import reset_peak_memory, peak_memory_bytes, current_rss_bytes
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(1024, 1024, bias=False) for _ in range(12)])
    opt = ShardedAdamW(model.parameters())
    model(torch.randn(2, 1024)).sum().backward(); opt.step(); opt.zero_grad()
    ck.save(sys.argv[1] + "/c", model=model, optimizer=opt)
    state = opt.state_bytes()
    del model, opt
    import gc; gc.collect()
    base = current_rss_bytes(); reset_peak_memory()
    ck.export_consolidated(sys.argv[1] + "/c", sys.argv[1] + "/out")
    print(json.dumps({"state": state, "growth": peak_memory_bytes() - base, "param": 1024 * 1024 * 4}))
    """
)


def test_export_memory_is_bounded(tmp_path):
    """12.6M params (96 MiB of Adam state, 48 MiB of weights): exporting grows the process by a small multiple of
    one parameter (4 MiB), not by the state size."""
    script = tmp_path / "export_mem.py"
    script.write_text(EXPORT_MEMORY)
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    out = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, env=env, check=True)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    print(res)
    assert res["growth"] < 8 * res["param"], res
    assert res["growth"] < res["state"] / 3, res


# ------------------------------------------------------------------------- save: every rank's part, agreed errors
@pytest.mark.dist
def test_each_rank_crcs_only_its_own_files():
    """No rank CRCs the others' files (rank 0 alone reading everything exceeds collective timeouts at scale)."""
    with tempfile.TemporaryDirectory() as root:
        seen = run(ckpt_workers.crc_per_rank, 3, root, timeout=120)
        table = json.loads(open(os.path.join(root, "c", ck.META_FILE)).read())["files"]
    for r, names in enumerate(seen):
        own = [n for n in table if n.startswith(f"__{r}_")]
        assert own, f"rank {r} wrote no files (test setup)"
        extra = {".metadata"} if r == 0 else set()  # DCP's metadata is written by rank 0 (the coordinator)
        assert sorted(names) == sorted(own + sorted(extra & set(table))), (r, names)
    assert sorted(n for names in seen for n in names) == sorted(table), "every file CRC'd exactly once"


@pytest.mark.dist
@pytest.mark.parametrize("where", ["meta", "swap"])
def test_a_failure_in_rank_zeros_part_of_save_raises_on_every_rank(where):
    """Writing the metadata (or the atomic swap) fails on rank 0 only: every rank raises the same CheckpointError
    (nobody hangs), and the previous checkpoint stays intact and loads on every rank."""
    with tempfile.TemporaryDirectory() as root:
        res = run(ckpt_workers.failing_save, 2, root, where, timeout=60)
    errors = [r["error"] for r in res]
    assert all(e is not None for e in errors), errors
    assert len(set(errors)) == 1, errors
    assert "rank 0" in errors[0] and "injected" in errors[0], errors[0]
    for r in res:
        assert r["extra"] == {"step": 2} and r["steps"] == 2, r
        assert r["listing"] == ["ckpt"], r["listing"]  # no half-written debris left beside it


# ------------------------------------------------------------------------------------- expert parallelism
@pytest.fixture(scope="module")
def expert_runs():
    """Expert groups of 2 ranks at world 4 and of 1 rank at world 2 (2 expert groups each, different experts):
    save at both, load each checkpoint at both, and export the world-4 one."""
    from safetensors.torch import load_file

    with tempfile.TemporaryDirectory() as root:
        saved = {n: run(ckpt_expert_workers.save_then_continue, n, root, K, timeout=240) for n in (4, 2)}
        loaded = {m: run(ckpt_expert_workers.load_and_continue, m, root, ["N4", "N2"], K, timeout=240)
                  for m in (4, 2)}
        refused = run(ckpt_expert_workers.load_refused, 2, root, "N4", 1, timeout=120)
        out = ck.export_consolidated(os.path.join(root, "N4"), os.path.join(root, "out"))
        exported = {"model": load_file(out["model"]), "optim": torch.load(out["optimizer"], weights_only=True)}
        meta = json.loads(open(os.path.join(root, "N4", ck.META_FILE)).read())
        yield saved, loaded, refused, exported, meta


def _same_snapshot(a, b, what):
    assert a["params"].keys() == b["params"].keys()
    for n in a["params"]:
        assert torch.equal(a["params"][n], b["params"][n]), (what, n)
    assert_state_equal(a["optim"], b["optim"])
    assert a["optim"]["param_groups"] == b["optim"]["param_groups"], what


@pytest.mark.dist
def test_expert_groups_keep_their_own_experts(expert_runs):
    saved, loaded, _, _, meta = expert_runs
    for n, ranks in saved.items():  # the setup: the two expert groups really hold different experts
        by_k = {r["at_save"]["k"]: r["at_save"] for r in ranks}
        assert not torch.equal(by_k[0]["params"]["experts.w"], by_k[1]["params"]["experts.w"])
        assert not torch.equal(by_k[0]["optim"]["state"][4]["exp_avg"], by_k[1]["optim"]["state"][4]["exp_avg"])
    for m, ranks in loaded.items():
        for rank, per_source in enumerate(ranks):
            for src, res in per_source.items():
                n = int(src[1:])
                k = res["loaded"]["k"]
                ref = next(r for r in saved[n] if r["at_save"]["k"] == k)  # a rank of the same expert group
                _same_snapshot(res["loaded"], ref["at_save"], (src, m, rank, "loaded"))
                if m == n:  # resume at the same world: the next step is identical, rank by rank
                    _same_snapshot(res["final"], saved[n][rank]["final"], (src, m, rank, "final"))
    layout = meta["expert_groups"]
    assert layout["param_groups"][0] is None
    assert layout["param_groups"][1]["count"] == 2 and layout["param_groups"][1]["ranks"] == [[0, 1], [2, 3]]


@pytest.mark.dist
def test_another_number_of_expert_groups_is_refused(expert_runs):
    refused = expert_runs[2]
    assert all(e is not None for e in refused), refused
    assert all("2 expert groups" in e and "1 here" in e for e in refused), refused


@pytest.mark.dist
def test_export_consolidated_names_each_expert_group(expert_runs):
    saved, _, _, exported, _ = expert_runs
    by_k = {r["at_save"]["k"]: r["at_save"] for r in saved[4]}
    weights = exported["model"]
    assert "experts.w" not in weights and "experts.proj" not in weights
    for k, snap in by_k.items():
        for name in ("experts.w", "experts.proj"):
            assert torch.equal(weights[f"{name}@ep{k}"], snap["params"][name]), (name, k)
        for name in ("dense.weight", "head.bias"):
            assert torch.equal(weights[name], snap["params"][name])
    sd = exported["optim"]
    # groups: dense, then one group per expert group for each expert param group
    assert [g.get("expert_group") for g in sd["param_groups"]] == [None, 0, 1, 0, 1]
    index = {}
    for g in sd["param_groups"]:
        for i, name in zip(g["params"], g["param_names"]):
            index[name] = i
    own = {"dense.weight": 0, "dense.bias": 1, "head.weight": 2, "head.bias": 3, "experts.w": 4, "experts.proj": 5}
    for k, snap in by_k.items():
        for name, j in own.items():
            key = f"{name}@ep{k}" if name.startswith("experts.") else name
            for kind, t in snap["optim"]["state"][j].items():
                assert torch.equal(sd["state"][index[key]][kind], t), (key, kind)
