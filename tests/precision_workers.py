"""Per-rank bodies of the precision-aware state tests (tests/test_precision.py)."""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist

from reference_precision import RefPrecisionAdamW
from workers import assert_ranks_identical
from zeroadamw import ShardedAdamW, SparseAdamW
from zeroadamw.quant import dequantize_tensor, quantize_tensor

HP = dict(lr=3e-3, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
MODES = {
    # name: (param dtype, optimizer options)
    "int8": ("float32", dict(state_dtype="int8")),
    "bf16_moments": ("float32", dict(state_dtype="bf16")),
    "int8_master": ("bfloat16", dict(state_dtype="int8")),
    "kahan": ("bfloat16", dict(master_dtype=None, kahan_sum=True)),
    "kahan_int8": ("bfloat16", dict(master_dtype=None, kahan_sum=True, state_dtype="int8")),
}


class Net(torch.nn.Module):
    """Odd sizes, three of them >= 4096 elements (int8), and small ones that stay fp32."""

    def __init__(self, vocab=67, d=96, h=80):
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, d)  # 6432
        self.fc1 = torch.nn.Linear(d, h)  # 7680 + 80
        self.norm = torch.nn.LayerNorm(h)  # 80 + 80
        self.fc2 = torch.nn.Linear(h, vocab)  # 5360 + 67

    def forward(self, ids):
        return self.fc2(self.norm(torch.nn.functional.gelu(self.fc1(self.emb(ids)))))


def make_net(dtype, seed=0):
    torch.manual_seed(seed)
    return Net().to(getattr(torch, dtype) if isinstance(dtype, str) else dtype)


def batch(step, vocab=67):
    g = torch.Generator().manual_seed(100 + step)  # the same on every rank: averaged gradients are exact at N = 2
    return torch.randint(0, vocab, (4, 9), generator=g)


def loss_of(model, ids):
    logits = model(ids).float()
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def train(model, opt, steps, start=0):
    out = []
    for s in range(start, start + steps):
        loss = loss_of(model, batch(s))
        loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
        out.append(loss.item())
    return out


def consolidated(sd):
    return {k: {n: t.clone() for n, t in st.items()} for k, st in sd["state"].items()}


def run_mode(rank, world_size, mode, extra, steps=6):
    """Our optimizer (``extra``: stage / step in backward / bucket size / clipping) and the whole-param reference
    on the same data; returns params, the consolidated state and the reference's, for the parent to compare."""
    dtype, opts = MODES[mode]
    model, ref_model = make_net(dtype), make_net(dtype)
    opt = ShardedAdamW(model.parameters(), **HP, **opts, **extra, impl="reference")  # the reference's arithmetic
    ref = RefPrecisionAdamW(ref_model.parameters(), **HP, state_dtype=opts.get("state_dtype", "fp32"),
                            master="master_dtype" not in opts, kahan=opts.get("kahan_sum", False))
    train(model, opt, steps)
    train(ref_model, ref, steps)
    assert_ranks_identical(list(model.parameters()))
    sd = opt.state_dict()
    ref_state = {i: ref.state[p] for i, p in enumerate(ref_model.parameters()) if p in ref.state}
    return {"params": [p.detach().clone() for p in model.parameters()],
            "ref_params": [p.detach().clone() for p in ref_model.parameters()],
            "state": consolidated(sd), "ref_state": ref_state, "state_bytes": opt.state_bytes()}


def in_backward_matches_step(rank, world_size, mode, clip):
    """Step in backward (fused, or exact clipping with max_grad_norm) against step() with the same options:
    the same bytes of params and state."""
    dtype, opts = MODES[mode]
    kw = dict(**HP, **opts, bucket_size=6000, max_grad_norm=clip)
    a, b = make_net(dtype), make_net(dtype)
    oa = ShardedAdamW(a.parameters(), **kw)
    ob = ShardedAdamW(b.parameters(), **kw, step_in_backward=True)
    la, lb = train(a, oa, 5), train(b, ob, 5)
    assert la == lb, (la, lb)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q), (p - q).abs().max()
    sa, sb = consolidated(oa.state_dict()), consolidated(ob.state_dict())
    for k in sa:
        for n in sa[k]:
            assert torch.equal(sa[k][n], sb[k][n]), (k, n)
    return True


def skipped_step_keeps_codes(rank, world_size, mode):
    """A non-finite gradient on one rank (fused step in backward: the skip is decided on the device) leaves
    params, int8 codes and scales, and the Kahan compensation bit for bit unchanged on every rank."""
    dtype, opts = MODES[mode]
    model = make_net(dtype)
    opt = ShardedAdamW(model.parameters(), **HP, **opts, bucket_size=6000, step_in_backward=True)
    train(model, opt, 3)
    before = consolidated(opt.state_dict())
    params = [p.detach().clone() for p in model.parameters()]
    loss = loss_of(model, batch(9)) * (float("inf") if rank == 1 else 1.0)
    loss.backward()
    opt.step()
    opt.zero_grad()
    assert opt.last_step_skipped
    after = consolidated(opt.state_dict())
    for p, q in zip(params, model.parameters()):
        assert torch.equal(p, q)
    for k in before:
        for n in before[k]:
            assert torch.equal(before[k][n], after[k][n]), (k, n)
    train(model, opt, 2, start=4)  # and training goes on
    assert all(torch.isfinite(p).all() for p in model.parameters())
    return True


def sparse_rows_int8(rank, world_size):
    """SparseAdamW, an embedding of 256-wide rows in a "rows" group with int8 moments: rows no rank touched
    keep their codes and scales bit for bit; the result equals one process (to float tolerance)."""
    torch.manual_seed(0)
    emb = torch.nn.Embedding(64, 256)
    head = torch.nn.Linear(256, 33)
    params = [{"params": [emb.weight], "sparse": "rows"}, {"params": list(head.parameters())}]
    opt = SparseAdamW(params, **HP, state_dtype="int8")
    kinds = opt.engine.where[emb.weight][0].moments
    assert kinds == "int8", kinds
    ids_of = lambda s: torch.arange(8) + 8 * (s % 3)  # noqa: E731 - rows 0..23 only: 24..63 stay idle
    for s in range(4):
        out = head(emb(ids_of(s))).square().mean()
        out.backward()
        opt.step()
        opt.zero_grad()
        if s == 0:
            first = consolidated(opt.state_dict())
    last = consolidated(opt.state_dict())
    idx = 0  # emb.weight is param index 0
    for kind in ("exp_avg", "exp_avg_sq"):
        assert last[idx][kind].dtype == torch.uint8
        assert torch.equal(first[idx][kind][24:], last[idx][kind][24:]), kind
        assert torch.equal(first[idx][kind + "_absmax"][24:], last[idx][kind + "_absmax"][24:])
        assert not torch.equal(first[idx][kind][:24], last[idx][kind][:24])
    return {"weight": emb.weight.detach().clone(), "state": last}


def checkpoint_save(rank, world_size, mode, path, bucket_size):
    import zeroadamw.checkpoint as ckpt

    dtype, opts = MODES[mode]
    model = make_net(dtype)
    opt = ShardedAdamW(model.parameters(), **HP, **opts, bucket_size=bucket_size)
    train(model, opt, 4)
    ckpt.save(path, model=model, optimizer=opt)
    return consolidated(opt.state_dict())


def checkpoint_load(rank, world_size, mode, path, bucket_size):
    """Load a checkpoint saved at another world size and bucket size: every consolidated tensor equal; then
    one more step on every rank, identical everywhere."""
    import zeroadamw.checkpoint as ckpt

    dtype, opts = MODES[mode]
    model = make_net(dtype, seed=5)
    opt = ShardedAdamW(model.parameters(), **HP, **opts, bucket_size=bucket_size)
    ckpt.load(path, model=model, optimizer=opt)
    got = consolidated(opt.state_dict())
    train(model, opt, 1, start=4)
    assert_ranks_identical(list(model.parameters()))
    return got


def state_dict_crossings(rank, world_size):
    """load_state_dict across storage kinds at N ranks: int8 -> fp32 (dequantized), fp32 -> int8 (quantized
    from the whole param: the codes a sharded run holds), a torch.optim.AdamW state dict -> int8, Kahan <->
    fp32 master."""
    model = make_net("float32")
    o8 = ShardedAdamW(model.parameters(), **HP, state_dtype="int8", bucket_size=5000)
    train(model, o8, 3)
    sd8 = o8.state_dict()
    o32 = ShardedAdamW(model.parameters(), **HP, bucket_size=7000)
    o32.load_state_dict(sd8)
    sd32 = o32.state_dict()
    for k, st in sd8["state"].items():
        if st["exp_avg"].dtype == torch.uint8:
            assert torch.equal(sd32["state"][k]["exp_avg"], dequantize_tensor(st["exp_avg"], st["exp_avg_absmax"], True))
            assert torch.equal(sd32["state"][k]["exp_avg_sq"],
                               dequantize_tensor(st["exp_avg_sq"], st["exp_avg_sq_absmax"], False))
            assert "exp_avg_absmax" not in sd32["state"][k]
    back = ShardedAdamW(model.parameters(), **HP, state_dtype="int8", bucket_size=3000)
    back.load_state_dict(sd32)  # fp32 -> int8: the whole-param quantization, sharded at another bucket size
    sdb = back.state_dict()
    for k, st in sd32["state"].items():
        if sd8["state"][k]["exp_avg"].dtype != torch.uint8:
            continue
        for n, signed in (("exp_avg", True), ("exp_avg_sq", False)):
            codes, absmax = quantize_tensor(st[n], signed)
            assert torch.equal(sdb["state"][k][n], codes) and torch.equal(sdb["state"][k][n + "_absmax"], absmax)
        # the unsigned map holds 1.0: exp_avg_sq's codes survive the round trip exactly
        assert torch.equal(sdb["state"][k]["exp_avg_sq"], sd8["state"][k]["exp_avg_sq"])
    # torch's own AdamW state dict into an int8 ShardedAdamW, then a step: both keep training alike
    tm = copy.deepcopy(model)
    topt = torch.optim.AdamW(tm.parameters(), **HP)
    train(tm, topt, 2)
    o = ShardedAdamW(tm.parameters(), **HP, state_dtype="int8")
    o.load_state_dict(topt.state_dict())
    assert o.state_dict()["state"][0]["exp_avg"].dtype == torch.uint8
    # bf16: Kahan compensation <-> fp32 master: a master not saved is the (loaded) param; a compensation not
    # saved starts at zero (never computed from a param that may not be loaded yet)
    mb = make_net("bfloat16")
    ok = ShardedAdamW(mb.parameters(), **HP, master_dtype=None, kahan_sum=True)
    train(mb, ok, 3)
    sdk = ok.state_dict()
    om = ShardedAdamW(mb.parameters(), **HP)
    om.load_state_dict(sdk)
    params = list(mb.parameters())
    for k, st in om.state_dict()["state"].items():
        assert torch.equal(st["master"], params[k].detach().float()) and "kahan_comp" not in st
        assert torch.equal(st["exp_avg"], sdk["state"][k]["exp_avg"])
    ok2 = ShardedAdamW(mb.parameters(), **HP, master_dtype=None, kahan_sum=True)
    ok2.load_state_dict(om.state_dict())
    for k, st in ok2.state_dict()["state"].items():
        assert not st["kahan_comp"].any() and "master" not in st
    ok2.load_state_dict(sdk)  # Kahan -> Kahan: the compensation as saved
    for k, st in ok2.state_dict()["state"].items():
        assert torch.equal(st["kahan_comp"], sdk["state"][k]["kahan_comp"])
    return True


def state_bytes_per_rank(rank, world_size, numel):
    """state_bytes() of one large bf16 param per mode: every byte counted (codes, scales, compensation, master)."""
    out = {}
    for name, opts in {"fp32": {}, "bf16": dict(state_dtype="bf16"), "int8": dict(state_dtype="int8"),
                       "kahan": dict(master_dtype=None, kahan_sum=True),
                       "kahan_int8": dict(master_dtype=None, kahan_sum=True, state_dtype="int8")}.items():
        p = torch.nn.Parameter(torch.randn(numel).to(torch.bfloat16))
        opt = ShardedAdamW([p], **HP, **opts)
        opt._init_state()
        out[name] = opt.state_bytes()
    return out



def host_reads(rank, world_size, mode, sib, clip):
    """Host reads at steady state with precision-aware state: none in backward, at most 2 per step() (as the
    fp32 state: tests/test_control.py) -- the codes, scales and compensation are handled on the device."""
    from host_reads import reads_per_step

    dtype, opts = MODES[mode]
    model = make_net(dtype)
    opt = ShardedAdamW(model.parameters(), **HP, **opts, bucket_size=6000, step_in_backward=sib, max_grad_norm=clip)
    return reads_per_step(lambda step: loss_of(model, batch(step)), opt, 5)
