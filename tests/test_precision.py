"""Precision-aware state: int8 / bf16 moments, Kahan-compensated bf16 weights without an fp32 master -- against
the whole-parameter reference (tests/reference_precision.py), across world sizes, stages, step in backward,
SparseAdamW rows, zeroadamw.AdamW, state dicts both ways, checkpoints resharded, and the byte accounting."""

import copy
import math
import pickle
import tempfile

import pytest
import torch

import precision_workers as W
from distributed import run
from reference_precision import RefPrecisionAdamW, ref_dequantize, ref_quantize
from zeroadamw import AdamW, ShardedAdamW, quant

# ------------------------------------------------------------------------------------------ quantization


def test_dynamic_maps_are_bitsandbytes_maps():
    bnb_f = pytest.importorskip("bitsandbytes.functional")
    for signed in (True, False):
        assert torch.equal(quant.dynamic_map(signed), bnb_f.create_dynamic_map(signed=signed).float())
    assert quant.dynamic_map(True)[quant.zero_code(True)] == 0 and quant.dynamic_map(False)[quant.zero_code(False)] == 0


@pytest.mark.parametrize("numel", [256, 1000, 4096 + 7])
def test_quantize_matches_the_brute_force_reference(numel):
    torch.manual_seed(numel)
    x = torch.randn(numel) * torch.logspace(-6, 0, numel)[torch.randperm(numel)]
    x[:256] = 0 if numel > 512 else x[:256]  # an all-zero block
    for signed, t in ((True, x), (False, x.abs())):
        codes, absmax = quant.quantize_tensor(t, signed)
        rc, ra = ref_quantize(t, signed)
        assert torch.equal(absmax, ra)
        assert torch.equal(codes, rc)
        back = quant.dequantize_tensor(codes, absmax, signed)
        assert torch.equal(back, ref_dequantize(rc, ra, signed))
        # the dynamic map keeps ~2 significant digits of every element relative to its block's max
        err = (back - t).abs() / absmax.repeat_interleave(quant.BLOCK)[:numel].clamp_min(1e-30)
        assert err.max() < 0.08, err.max()


def test_lookup_quantizer_is_exactly_the_nearest_midpoint_search():
    """The table lookup (top 17 float bits, one compare) gives torch.bucketize's code for every value, including
    the midpoints themselves, their float neighbours, the map values, +-0, +-1, tiny and denormal values."""
    for signed in (True, False):
        qmap = quant.dynamic_map(signed)
        mids = (qmap[1:] + qmap[:-1]) / 2
        special = torch.cat([mids, torch.nextafter(mids, torch.tensor(2.0)), torch.nextafter(mids, torch.tensor(-2.0)),
                             qmap, torch.tensor([0.0, -0.0, 1.0, -1.0, 1e-30, -1e-30, 1e-40, 5e-8, -5e-8])])
        y = torch.cat([special, torch.rand(50_000) * 2 - 1 if signed else torch.rand(50_000),
                       torch.logspace(-12, 0, 4000) * (1 if not signed else torch.sign(torch.randn(4000)))])
        y = y[: y.numel() // quant.BLOCK * quant.BLOCK]
        if not signed:
            y = y.abs()
        y = y.clamp(-1, 1)
        blocks = y.view(-1, quant.BLOCK).clone()
        blocks[:, 0] = 1.0  # absmax 1 in every block: the normalized values are the values themselves
        codes = torch.empty(blocks.numel(), dtype=torch.uint8)
        quant.quantize(blocks.view(-1), codes, torch.empty(blocks.shape[0]), signed)
        assert torch.equal(codes.long(), torch.bucketize(blocks.view(-1), mids)), signed


# --------------------------------------------------------------------------- one process: bit for bit


# zeroadamw.AdamW keeps no fp32 master (torch's behaviour): not int8_master; its bf16 cases are the Kahan ones
@pytest.mark.parametrize("mode,cls", [(m, "ShardedAdamW") for m in W.MODES] +
                         [(m, "AdamW") for m in W.MODES if m != "int8_master"])
def test_one_process_equals_the_reference_bit_for_bit(mode, cls):
    dtype, opts = W.MODES[mode]
    if cls == "AdamW":
        opts = {k: v for k, v in opts.items() if k != "master_dtype"}
    model, ref_model = W.make_net(dtype), W.make_net(dtype)
    opt = (ShardedAdamW if cls == "ShardedAdamW" else AdamW)(model.parameters(), **W.HP, **opts, impl="reference")
    ref = RefPrecisionAdamW(ref_model.parameters(), **W.HP, state_dtype=opts.get("state_dtype", "fp32"),
                            master="master_dtype" not in W.MODES[mode][1] and cls == "ShardedAdamW",
                            kahan=opts.get("kahan_sum", False))
    assert W.train(model, opt, 8) == W.train(ref_model, ref, 8)
    for p, q in zip(model.parameters(), ref_model.parameters()):
        assert torch.equal(p, q), (p - q).abs().max()
    sd = opt.state_dict()["state"]
    for i, q in enumerate(ref_model.parameters()):
        for k, t in ref.state[q].items():
            assert torch.equal(sd[i][k], t.view_as(sd[i][k])), (i, k)
    if opts.get("state_dtype") == "int8":
        assert sd[0]["exp_avg"].dtype == torch.uint8  # the embedding: quantized
        assert sd[4]["exp_avg"].dtype == torch.float32  # the LayerNorm weight (80 elements): fp32


def test_gpu_tier_check_runs_here():
    """The CUDA tier's check (tests/test_cuda.py, run by scripts/gpu_check.sh) on CPU: step in backward equals
    step() for each storage, N = 1 (DirectBucket path). On a GPU it also runs under sync-debug "error"."""
    from test_cuda import check_precision_modes_sync_free

    worst = check_precision_modes_sync_free("cpu")
    assert set(worst) == {"int8", "kahan_int8", "bf16_moments"} and max(worst.values()) == 0.0


def test_kahan_tracks_the_fp32_master_and_plain_bf16_does_not():
    """Small updates (lr 1e-5, far below a bf16 ulp of the weights): Kahan's param + compensation follows the
    fp32-master run; the plain bf16 update loses most of them."""
    runs = {}
    for name, opts in {"master": {}, "kahan": dict(master_dtype=None, kahan_sum=True),
                       "plain": dict(master_dtype=None, state_dtype="fp32")}.items():
        model = W.make_net("bfloat16")
        opt = ShardedAdamW(model.parameters(), lr=1e-5, weight_decay=0.0, **opts)
        W.train(model, opt, 40)
        sd = opt.state_dict()["state"]
        runs[name] = [sd[i]["master"] if "master" in sd[i] else
                      p.detach().float() + sd[i].get("kahan_comp", torch.zeros_like(p)).float()
                      for i, p in enumerate(model.parameters())]
    start = [p.detach().float() for p in W.make_net("bfloat16").parameters()]
    moved = sum((m - s).abs().sum() for m, s in zip(runs["master"], start))
    err_k = sum((k - m).abs().sum() for k, m in zip(runs["kahan"], runs["master"])) / moved
    err_p = sum((k - m).abs().sum() for k, m in zip(runs["plain"], runs["master"])) / moved
    assert err_k < 0.02, err_k
    assert err_p > 0.3, err_p


@pytest.mark.parametrize("cls", [ShardedAdamW, AdamW])
def test_second_moment_underflow_does_not_blow_up_the_update(cls):
    """One block holds a large, steady gradient and a tiny one that then stops (an embedding row seen once):
    the tiny element's v falls below the unsigned map's smallest code relative to the block's max and
    quantizes to 0 while its m does not. Unguarded, its update would be m / eps; with the guard it stays
    within a few lr of fp32 AdamW's."""
    lr = 1e-3
    runs = {}
    for sd in ("fp32", "int8"):
        p = torch.nn.Parameter(torch.zeros(4096))
        opt = cls([p], lr=lr, weight_decay=0.0, state_dtype=sd)
        for step in range(30):
            g = torch.zeros(4096)
            g[0] = 1.0
            if step == 0:
                g[1] = 1e-4
            p.grad = g
            opt.step()
        runs[sd] = p.detach().clone()
    assert (runs["int8"] - runs["fp32"]).abs().max() < 5 * lr
    assert runs["int8"][1].abs() < 5 * lr


@pytest.mark.parametrize("cls", [ShardedAdamW, AdamW])
def test_bf16_moments_decay_like_fp32(cls):
    """One large gradient, then 300 small ones: exp_avg_sq must decay (beta2 = 0.999). Round-to-nearest bf16
    would keep 0.999 v == v forever; stochastic rounding follows fp32 within a few %."""
    vs = {}
    for sd in ("fp32", "bf16"):
        p = torch.nn.Parameter(torch.zeros(4096))
        opt = cls([p], lr=1e-3, weight_decay=0.0, state_dtype=sd)
        for step in range(301):
            p.grad = torch.full((4096,), 1.0 if step == 0 else 1e-3)
            opt.step()
        vs[sd] = opt.state[p]["exp_avg_sq"].float()
    ratio = vs["bf16"] / vs["fp32"]  # each element a random walk of rounding noise, unbiased
    assert abs(ratio.mean() - 1) < 0.01 and (ratio - 1).abs().max() < 0.2, ratio
    assert vs["fp32"][0] < 0.8 * 1e-3  # it did decay (from 1e-3 after the spike)


def test_load_order_does_not_matter_for_master_and_kahan_conversions():
    """state_dict of an fp32-master run loaded into a Kahan optimizer (and back) before or after the model
    weights: the same result (the compensation starts at zero; a missing master is re-read from the loaded
    param at the first update)."""
    kahan = dict(master_dtype=None, kahan_sum=True)
    for source, target in (({}, kahan), (kahan, {})):  # master -> Kahan, Kahan -> master
        src = W.make_net("bfloat16")
        so = ShardedAdamW(src.parameters(), **W.HP, **source)
        W.train(src, so, 3)
        results = []
        for model_first in (True, False):
            m = W.make_net("bfloat16", seed=7)  # other weights until the model is loaded
            o = ShardedAdamW(m.parameters(), **W.HP, **target)
            if model_first:
                m.load_state_dict(src.state_dict())
            o.load_state_dict(so.state_dict())
            if not model_first:
                m.load_state_dict(src.state_dict())
            W.train(m, o, 1, start=3)
            results.append([p.detach().clone() for p in m.parameters()])
        for p, q in zip(*results):
            assert torch.equal(p, q), (source, target)
        W.train(src, so, 1, start=3)  # and close to the source run going on (at most half an ulp of state lost)
        for p, q in zip(results[0], src.parameters()):
            assert (p.float() - q.float()).abs().max() < 2e-2


def test_deepspeed_client_mode_load_state_dict_keeps_codes():
    """ShardedAdamW acting plain (its param_groups replaced by a flat partition, as DeepSpeed does): its
    state_dict loads back with uint8 codes and fp32 scales intact, and training continues identically."""
    def plain_opt(seed):
        torch.manual_seed(seed)
        opt = ShardedAdamW([torch.nn.Parameter(torch.randn(64))], lr=1e-2, state_dtype="int8")
        flat = torch.nn.Parameter(torch.randn(8192, generator=torch.Generator().manual_seed(3)))
        opt.param_groups[0]["params"] = [flat]
        return opt, flat

    a, fa = plain_opt(0)
    for s in range(3):
        fa.grad = torch.randn(8192, generator=torch.Generator().manual_seed(s))
        a.step()
    b, fb = plain_opt(1)
    with torch.no_grad():
        fb.copy_(fa)
    fb.grad = torch.zeros(8192)
    b.step()  # engage plain mode before loading (as DeepSpeed's first step does)
    with torch.no_grad():
        fb.copy_(fa)
    b.load_state_dict(a.state_dict())
    assert b.state[fb]["exp_avg"].dtype == torch.uint8 and b.state[fb]["exp_avg_absmax"].dtype == torch.float32
    for opt, flat in ((a, fa), (b, fb)):
        flat.grad = torch.randn(8192, generator=torch.Generator().manual_seed(9))
        opt.step()
    assert torch.equal(fa, fb)


def test_int8_with_fp64_math_and_sparse_pending_decay_with_kahan():
    p = torch.nn.Parameter(torch.randn(4096, dtype=torch.float64))
    ref = torch.nn.Parameter(p.detach().clone())
    o, r = ShardedAdamW([p], lr=1e-3, state_dtype="int8"), torch.optim.AdamW([ref], lr=1e-3)
    for s in range(5):
        g = torch.randn(4096, dtype=torch.float64, generator=torch.Generator().manual_seed(s))
        p.grad, ref.grad = g.clone(), g.clone()
        o.step()
        r.step()
    assert (p - ref).abs().max() < 1e-3
    # SparseAdamW: idle rows' pending decay with Kahan equals the fp32-master run's (param + compensation)
    from zeroadamw import SparseAdamW

    out = {}
    for name, kw in (("master", {}), ("kahan", dict(master_dtype=None, kahan_sum=True))):
        torch.manual_seed(0)
        emb = torch.nn.Embedding(16, 8).to(torch.bfloat16)
        opt = SparseAdamW([{"params": [emb.weight], "sparse": "rows"}], lr=1e-2, weight_decay=0.1, **kw)
        for _ in range(10):
            emb(torch.tensor([0])).float().sum().backward()
            opt.step()
            opt.zero_grad()
        opt.apply_pending_decay()
        st = opt.state_dict()["state"][0]
        out[name] = st["master"] if name == "master" else emb.weight.detach().float() + st["kahan_comp"].float()
    torch.testing.assert_close(out["kahan"][1:], out["master"][1:], rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------------------ N processes


@pytest.mark.parametrize("mode,world_size,extra", [
    ("int8", 2, dict(bucket_size=5000)),
    ("kahan_int8", 3, dict(bucket_size=9000, stage=1, reduce_dtype=torch.float64)),
    ("kahan", 3, dict(bucket_size=20000, reduce_dtype=torch.float64)),
    ("int8_master", 2, dict(bucket_size=4000, step_in_backward=True)),
    ("bf16_moments", 4, dict(bucket_size=3000)),
])
def test_sharded_equals_the_reference_at_every_world_size(mode, world_size, extra):
    """Shard boundaries inside params (small buckets), the param's blocks cut across ranks: params and every
    consolidated state tensor -- codes, scales, compensation -- equal the whole-param reference bit for bit.
    Every rank trains on the same data, so the averaged gradient is exact (N = 3: in an fp64 reduction,
    3g / 3 = g), and the update math is the reference kernel's: any difference is the storage's."""
    res = run(W.run_mode, world_size, mode, extra)[0]
    for p, q in zip(res["params"], res["ref_params"]):
        assert torch.equal(p, q), (p - q).abs().max()
    for i, ref in res["ref_state"].items():
        got = res["state"][i]
        assert set(got) >= set(ref), (set(got), set(ref))
        for k, t in ref.items():
            assert torch.equal(got[k].view_as(t), t), (i, k)


@pytest.mark.parametrize("mode,clip", [("kahan_int8", None), ("int8", 0.05)])
def test_step_in_backward_equals_step(mode, clip):
    assert all(run(W.in_backward_matches_step, 2, mode, clip))


@pytest.mark.parametrize("mode,sib,clip", [("kahan_int8", True, None), ("int8", True, 1.0), ("bf16_moments", False, None)])
def test_no_host_reads_in_backward_and_at_most_two_per_step(mode, sib, clip):
    for r in run(W.host_reads, 2, mode, sib, clip):
        assert all(n == 0 for n in r["backward"][2:]), (r["backward"], r["where"][2:])
        assert all(n <= 2 for n in r["step"][2:]), (r["step"], r["where"][2:])


def test_skipped_step_keeps_codes_scales_and_compensation():
    assert all(run(W.skipped_step_keeps_codes, 2, "kahan_int8"))


def test_sparse_rows_int8_idle_rows_keep_their_codes():
    two = run(W.sparse_rows_int8, 2)
    one = W.sparse_rows_int8(0, 1)
    torch.testing.assert_close(two[0]["weight"], one["weight"], rtol=1e-5, atol=1e-6)
    assert (two[0]["state"][0]["exp_avg"] != one["state"][0]["exp_avg"]).float().mean() < 1e-3


@pytest.mark.parametrize("mode", ["int8", "kahan_int8"])
def test_checkpoint_reshards_int8_and_kahan_state_exactly(mode):
    with tempfile.TemporaryDirectory() as d:
        saved = run(W.checkpoint_save, 2, mode, d + "/ck", 5000)[0]
        for n, bucket in ((3, 9000), (1, 3000)):
            got = run(W.checkpoint_load, n, mode, d + "/ck", bucket)[0] if n > 1 else \
                W.checkpoint_load(0, 1, mode, d + "/ck", bucket)
            for k in saved:
                for kind, t in saved[k].items():
                    assert torch.equal(got[k][kind], t), (n, k, kind)
        from zeroadamw.checkpoint import export_consolidated

        out = export_consolidated(d + "/ck", d + "/exp")
        sd = torch.load(out["optimizer"], weights_only=True)
        for k, st in sd["state"].items():
            assert st["exp_avg"].dtype == torch.float32 and "exp_avg_absmax" not in st and "kahan_comp" not in st
            if saved[k]["exp_avg"].dtype == torch.uint8:
                assert torch.equal(st["exp_avg"], quant.dequantize_tensor(saved[k]["exp_avg"],
                                                                          saved[k]["exp_avg_absmax"], True))
        model = W.make_net(W.MODES[mode][0])
        torch.optim.AdamW(model.parameters()).load_state_dict(sd)  # torch takes it


def test_state_dicts_convert_between_storage_kinds():
    assert all(run(W.state_dict_crossings, 2))


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_state_bytes_count_every_byte(world_size):
    numel = 1 << 16
    got = run(W.state_bytes_per_rank, world_size, numel)[0] if world_size > 1 else W.state_bytes_per_rank(0, 1, numel)
    per = {k: v / (numel / world_size) for k, v in got.items()}
    assert per["fp32"] == 12  # moments 8 + master 4
    assert per["bf16"] == 8  # moments 4 + master 4
    assert per["int8"] == pytest.approx(4 + 2 + 8 / 256)  # master + codes + scales
    assert per["kahan"] == 10  # moments 8 + compensation 2: the master's 4 gone, 2 added
    assert per["kahan_int8"] == pytest.approx(2 + 2 + 8 / 256)
    assert per["kahan_int8"] - 2 <= 2.1  # int8 moments alone
    if world_size == 1:  # zeroadamw.AdamW (no master: torch's storage) counts the same way
        for sd, want in (("fp32", 10), ("int8", 2 + 2 + 8 / 256)):
            p = torch.nn.Parameter(torch.randn(numel).to(torch.bfloat16))
            o = AdamW([p], state_dtype=sd, kahan_sum=True)
            p.grad = torch.randn_like(p)
            o.step()
            assert o.state_bytes() / numel == pytest.approx(want)


# ------------------------------------------------------------------------------------ torch.optim idioms


@pytest.mark.parametrize("cls", [ShardedAdamW, AdamW])
def test_deepcopy_pickle_and_torch_state_dicts(cls):
    model = W.make_net("bfloat16")
    opt = cls(model.parameters(), **W.HP, state_dtype="int8", kahan_sum=True,
              **({"master_dtype": None} if cls is ShardedAdamW else {}))
    W.train(model, opt, 3)
    sd = opt.state_dict()
    for c in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        for k, st in c.state_dict()["state"].items():
            for n, t in st.items():
                assert torch.equal(t, sd["state"][k][n]), (k, n)
    # AdamW (int8) <-> ShardedAdamW (int8): the same storage, loaded as is
    other = (AdamW if cls is ShardedAdamW else ShardedAdamW)(
        model.parameters(), **W.HP, state_dtype="int8", kahan_sum=True,
        **({"master_dtype": None} if cls is AdamW else {}))
    other.load_state_dict(sd)
    for k, st in other.state_dict()["state"].items():
        for n, t in st.items():
            assert torch.equal(t, sd["state"][k][n]), (k, n)
    # a torch AdamW state dict (fp32 moments) into an int8 AdamW: quantized, and torch's cast did not round it
    tm = W.make_net("float32")
    t = torch.optim.AdamW(tm.parameters(), **W.HP)
    W.train(tm, t, 2)
    o = AdamW(tm.parameters(), **W.HP, state_dtype="int8")
    o.load_state_dict(t.state_dict())
    codes, absmax = quant.quantize_tensor(t.state[tm.emb.weight]["exp_avg"], True)
    assert torch.equal(o.state[tm.emb.weight]["exp_avg"], codes)
    assert torch.equal(o.state[tm.emb.weight]["exp_avg_absmax"], absmax)


def test_grad_scaler_fp16_kahan_int8_and_a_group_added_later():
    """fp16 weights with Kahan + int8 moments under torch.amp.GradScaler: an overflowing step is skipped (codes,
    compensation, params unchanged; the scale halves), training goes on; a param group added after the state
    exists gets int8 state of its own and trains."""
    model = W.make_net("float16")
    extra = torch.nn.Parameter(torch.randn(64, 96, dtype=torch.float16))  # 6144 elements: int8
    opt = ShardedAdamW(model.parameters(), **W.HP, master_dtype=None, kahan_sum=True, state_dtype="int8")
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    for step in range(6):
        loss = W.loss_of(model, W.batch(step))
        if step == 3:
            loss = loss * float("inf")
            before = {k: {n: t.clone() for n, t in st.items()} for k, st in opt.state_dict()["state"].items()}
            params = [p.detach().clone() for p in model.parameters()]
        scaler.scale(loss).backward()
        scale = scaler.get_scale()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        if step == 3:
            assert opt.last_step_skipped and scaler.get_scale() == scale / 2
            after = opt.state_dict()["state"]
            assert all(torch.equal(after[k][n], t) for k, st in before.items() for n, t in st.items())
            assert all(torch.equal(p, q) for p, q in zip(params, model.parameters()))
        if step == 4:
            opt.add_param_group({"params": [extra]})
        if step >= 4:
            extra.grad = None
    assert torch.isfinite(torch.cat([p.detach().float().reshape(-1) for p in model.parameters()])).all()
    start = extra.detach().clone()
    (extra.float() ** 2).sum().backward()
    opt.step()
    st = opt.state[extra]
    assert st["exp_avg"].dtype == torch.uint8 and "kahan_comp" in st and not torch.equal(extra, start)


def test_bad_precision_options_name_the_fix():
    p = [torch.nn.Parameter(torch.zeros(8, dtype=torch.bfloat16))]
    with pytest.raises(ValueError, match="state_dtype must be one of"):
        ShardedAdamW(p, state_dtype="int4")
    with pytest.raises(ValueError, match="a string, not a torch.dtype"):
        ShardedAdamW(p, state_dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="pass master_dtype=None"):
        ShardedAdamW(p, kahan_sum=True)
    with pytest.raises(TypeError, match="kahan_sum must be True or False"):
        AdamW(p, kahan_sum=1)
    with pytest.raises(ValueError, match="rule='lomo' keeps none"):
        ShardedAdamW(p, rule="lomo", state_dtype="int8")
    with pytest.raises(ValueError, match="not 'adalomo'"):
        ShardedAdamW(p, rule="adalomo", master_dtype=None, kahan_sum=True)
    # LOMO with Kahan works (element-wise): bf16 weights without a master
    q = torch.nn.Parameter(torch.ones(8, dtype=torch.bfloat16))
    o = ShardedAdamW([q], rule="lomo", lr=1e-4, weight_decay=0.0, master_dtype=None, kahan_sum=True)
    for _ in range(10):
        q.grad = torch.ones_like(q)
        o.step()
    total = q.detach().float() + o.state[q]["kahan_comp"].float()
    torch.testing.assert_close(total, torch.full((8,), 1 - 1e-3), rtol=0, atol=2e-6)
    assert torch.equal(q.detach(), torch.ones(8, dtype=torch.bfloat16))  # each 1e-4 step is below half an ulp
    assert math.isclose(o.state_bytes(), 8 * 2)  # the compensation only
