r"""How a bucket stores its optimizer state, and the fp32 working copies the update math runs on.

Storage kinds of the Adam moments (``state_dtype``), per bucket:

* ``"fp32"`` -- as ``torch.optim.AdamW`` with an fp32 master: 8 bytes per element;
* ``"bf16"`` -- bf16 storage, fp32 math (Megatron's precision-aware optimizer), ``exp_avg_sq`` stored with
  stochastic rounding (round-to-nearest would freeze it: :func:`zeroadamw.quant.stochastic_bf16`): 4 bytes;
* ``"int8"`` -- block-wise dynamic quantization (:mod:`zeroadamw.quant`, 8-bit Adam): one byte per element per
  moment plus one fp32 absmax per 256 elements: 2.03 bytes. Only params of at least
  :data:`~zeroadamw.quant.MIN_QUANTIZED_NUMEL` elements; smaller ones (biases, norms) keep fp32 moments, in
  buckets of their own;
* the param dtype itself (``state_dtype=None`` with ``master_dtype=None``, or ``"bf16"`` on bf16 params without
  master or Kahan: what ``torch.optim.AdamW`` does for bf16 params; the kernel runs on them directly -- the fused
  one computes in fp32 internally, the foreach one in bf16).

An int8 ``state_dict()`` holds the uint8 codes (``exp_avg``, ``exp_avg_sq``) and fp32 scales (``*_absmax``):
ShardedAdamW, SparseAdamW and :class:`zeroadamw.AdamW` load it (converting to their storage);
``torch.optim.AdamW`` would silently cast the codes to floats -- give torch ``export_consolidated``'s output.

Weights of bf16/fp16 params (``master_dtype``, ``kahan_sum``):

* an fp32 master shard (default): 4 bytes per element;
* ``master_dtype=None, kahan_sum=True``: a compensation buffer in the param dtype (2 bytes): the weight is the
  pair ``param + comp`` in fp32 arithmetic at every update and is split back after it -- ``param`` the nearest
  bf16, ``comp`` the remainder -- so updates far below a bf16 ulp accumulate instead of being rounded away
  (Kahan summation; optimi's approach, Zamirai et al., 2020);
* ``master_dtype=None`` alone: the plain low-precision update. Updates smaller than half a bf16 ulp of the
  weight (about 0.2 % of it) are lost: with lr 1e-5 most of a fine-tune's steps are. Use Kahan.

:func:`working` gives the kernel fp32 tensors for the owned part of each updated param (views where the storage
already is that, copies otherwise); :func:`store` writes them back (rounding, quantizing, splitting). With a
``found_inf`` (the fused step in backward decides a skip on the device) the stored values are selected on the
device, so a skipped update leaves codes, scales and compensation bit-for-bit unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from . import quant

if TYPE_CHECKING:
    from .buckets import Bucket

__all__ = ["STATE_DTYPES", "Working", "working", "store", "moment_dtype"]

STATE_DTYPES = ("fp32", "bf16", "int8")
_FLOAT = {"fp32": torch.float32, "bf16": torch.bfloat16}


def moment_dtype(state_dtype: str | None, param_dtype: torch.dtype, master: torch.dtype | None,
                 kahan: bool) -> torch.dtype | str:
    """The storage of a bucket's moments: a float dtype, or ``"int8"``. ``None`` (auto): the master's dtype;
    without a master fp32 with Kahan, else the param's own dtype (as ``torch.optim.AdamW``: bf16 params, bf16
    moments). fp64 params keep fp64 moments under ``"fp32"``."""
    if state_dtype == "int8":
        return "int8"
    if state_dtype == "bf16":
        return torch.bfloat16
    if state_dtype == "fp32":
        return torch.float64 if param_dtype == torch.float64 else torch.float32
    if master is not None:
        return master
    return torch.float32 if kahan else param_dtype


def acc_dtype(param_dtype: torch.dtype, master: torch.dtype | None, kahan: bool) -> torch.dtype:
    """What reduced gradients accumulate in (over backward passes, in the 1/N shard): the master's dtype, fp32
    for Kahan-compensated bf16/fp16 params (as with a master: the update reads fp32 anyway), else the param's."""
    if master is not None:
        return master
    if kahan and param_dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    return param_dtype


@dataclass
class Working:
    """The tensors one kernel call updates (owned parts of params ``idx``), and how to write them back."""

    targets: list[Tensor]
    exp_avgs: list[Tensor] = field(default_factory=list)
    exp_avg_sqs: list[Tensor] = field(default_factory=list)
    write_target: bool = False  # targets are copies (Kahan pair, upcast param): split / round back
    write_moments: bool = False  # moments are copies (bf16 / int8 storage)
    blocks: list[tuple[Tensor, Tensor]] = field(default_factory=list)  # int8: the whole dequantized block runs


def _compute_dtype(bucket: "Bucket") -> torch.dtype:
    """What the update math runs in: the master's or fp32, except the native low-precision path."""
    if bucket.master is not None:
        return bucket.master.dtype
    if bucket.kahan or bucket.moments == "int8" or (isinstance(bucket.moments, torch.dtype) and
                                                    bucket.moments != bucket.dtype):
        return torch.float32 if bucket.dtype != torch.float64 else torch.float64
    return bucket.dtype


def padded_range(bucket: "Bucket", i: int) -> tuple[int, int, int]:
    """For int8 buckets: the shard range of param ``i``'s owned part, extended to its last block's end (params
    start on block boundaries and shards are cut on them: the extension is the param's own padding), and the
    owned length."""
    s = bucket.layout.slots[i]
    return s.shard_lo, s.shard_lo + quant.nblocks(s.owned) * quant.BLOCK, s.owned


def working(bucket: "Bucket", idx: list[int], moments: bool) -> Working:
    """fp32 (compute-dtype) tensors for the owned parts of params ``idx``: target weights, and the moments when
    the rule keeps flat ones (``moments``)."""
    cd = _compute_dtype(bucket)
    if bucket.master is not None:
        targets, write_t = [bucket.shard_view(bucket.master, i) for i in idx], False
    elif bucket.kahan:
        targets = [bucket.owned_param_view(i).to(cd).add_(bucket.shard_view(bucket.kahan_comp, i)) for i in idx]
        write_t = True
    elif bucket.dtype != cd:
        targets, write_t = [bucket.owned_param_view(i).to(cd) for i in idx], True
    else:
        targets, write_t = [bucket.owned_param_view(i) for i in idx], False
    w = Working(targets, write_target=write_t)
    if not moments:
        return w
    if bucket.moments == "int8":
        for i in idx:
            lo, hi, n = padded_range(bucket, i)
            b0, b1 = lo // quant.BLOCK, hi // quant.BLOCK
            m = quant.dequantize(bucket.exp_avg[lo:hi], bucket.exp_avg_absmax[b0:b1], True)
            v = quant.dequantize(bucket.exp_avg_sq[lo:hi], bucket.exp_avg_sq_absmax[b0:b1], False)
            quant.guard_underflow(m, v)
            m, v = m.to(cd), v.to(cd)  # fp64 math (fp64 params or master): the kernel takes one dtype
            w.blocks.append((m, v))  # the tail past n is the param's block padding: zero codes, stays zero
            w.exp_avgs.append(m[:n])
            w.exp_avg_sqs.append(v[:n])
        w.write_moments = True
    elif bucket.exp_avg.dtype != cd:
        w.exp_avgs = [bucket.shard_view(bucket.exp_avg, i).to(cd) for i in idx]
        w.exp_avg_sqs = [bucket.shard_view(bucket.exp_avg_sq, i).to(cd) for i in idx]
        w.write_moments = True
    else:
        w.exp_avgs = [bucket.shard_view(bucket.exp_avg, i) for i in idx]
        w.exp_avg_sqs = [bucket.shard_view(bucket.exp_avg_sq, i) for i in idx]
    return w


def _put(dst: Tensor, new: Tensor, keep: Tensor | None) -> None:
    """``dst <- new`` (cast), except where ``keep`` (a device-side bool, broadcast over ``dst``) is set."""
    if keep is None:
        dst.copy_(new)
    else:
        dst.copy_(torch.where(keep, dst, new.to(dst.dtype)))


def store(bucket: "Bucket", idx: list[int], w: Working, found_inf: Tensor | None,
          rows_touched: Tensor | None = None, steps: list[Tensor] | None = None) -> None:
    """Write the updated working tensors back into the bucket's storage (see :func:`working`). ``found_inf``
    (0-d, device): a skipped update keeps every stored value. ``rows_touched`` (one row-sharded param,
    SparseAdamW): rows not touched keep theirs -- codes and scales of idle rows never drift. ``steps`` (the
    params' step counts, per row for row buckets): a bf16 ``exp_avg_sq`` is rounded stochastically, keyed on
    each element's index in its param and its step (:func:`zeroadamw.quant.stochastic_bf16`)."""
    keep = keep_blocks = None
    if found_inf is not None:
        keep = keep_blocks = found_inf.to(device=bucket.device).bool()
    elif rows_touched is not None:
        keep = (~rows_touched).repeat_interleave(bucket.D)
        keep_blocks = (~rows_touched).repeat_interleave(max(1, bucket.D // quant.BLOCK)).unsqueeze(1)
    if w.write_target:
        for i, t in zip(idx, w.targets):
            p = bucket.owned_param_view(i)
            if bucket.kahan:
                new = t.to(p.dtype)
                comp = t.sub_(new.to(t.dtype))  # what the bf16 weight could not hold
                _put(bucket.shard_view(bucket.kahan_comp, i), comp, keep)
                _put(p, new, keep)
            else:
                _put(p, t, keep)
    if not w.write_moments:
        return
    if bucket.moments == "int8":
        for i, (m, v) in zip(idx, w.blocks):
            lo, hi, _ = padded_range(bucket, i)
            b0, b1 = lo // quant.BLOCK, hi // quant.BLOCK
            for signed, full, codes, absmax in ((True, m, bucket.exp_avg, bucket.exp_avg_absmax),
                                                (False, v, bucket.exp_avg_sq, bucket.exp_avg_sq_absmax)):
                full = full.float()  # (a no-op but for fp64 math)
                if keep_blocks is None:
                    quant.quantize(full, codes[lo:hi], absmax[b0:b1], signed)
                    continue
                c, a = torch.empty_like(codes[lo:hi]), torch.empty_like(absmax[b0:b1])
                quant.quantize(full, c, a, signed)
                _put(codes[lo:hi].view(-1, quant.BLOCK), c.view(-1, quant.BLOCK), keep_blocks)
                _put(absmax[b0:b1], a, keep_blocks.view(-1) if keep_blocks.dim() else keep_blocks)
        return
    for j, (i, m, v) in enumerate(zip(idx, w.exp_avgs, w.exp_avg_sqs)):
        if bucket.exp_avg.dtype == torch.bfloat16 and m.dtype == torch.float32 and steps is not None:
            s = bucket.layout.slots[i]
            index = torch.arange(s.own_lo, s.own_hi, dtype=torch.int32, device=m.device)
            step = steps[j] if steps[j].dim() == 0 else steps[j].repeat_interleave(bucket.D)
            v = quant.stochastic_bf16(v, index, step, 2)  # (exp_avg: round-to-nearest is fine)
        _put(bucket.shard_view(bucket.exp_avg, i), m, keep)
        _put(bucket.shard_view(bucket.exp_avg_sq, i), v, keep)


_MOMENTS = (("exp_avg", True), ("exp_avg_sq", False))


def convert_entry(p: Tensor, st: dict, mine: dict[str, Tensor], where: str) -> dict:
    """A loaded whole-parameter state entry ``st`` of ``p`` in the storage this optimizer keeps (``mine``: its
    state tensors by kind): int8 codes + scales dequantized for float moments, float moments quantized for int8
    ones (blocks from the param's first element: the codes a sharded run holds at any world size). A Kahan
    compensation the saved state lacks starts at zero (at most half a bf16 ulp lost, once), and a master it
    lacks is re-read from the loaded param at the first update -- neither is computed from the param here, which
    may not be loaded yet. Float dtypes are left to the copy (it casts). Returns a new dict; ``st`` unchanged."""
    st = dict(st)
    for k, signed in _MOMENTS:
        if k not in mine or not isinstance(st.get(k), Tensor):
            continue
        amax = k + "_absmax"
        ours, saved = mine[k].dtype == torch.uint8, st[k].dtype == torch.uint8
        if saved and not ours:
            if not isinstance(st.get(amax), Tensor) or st[amax].numel() != quant.nblocks(st[k].numel()):
                raise ValueError(f"{where}: loaded {k} holds 8-bit codes without a matching {amax}")
            st[k] = quant.dequantize_tensor(st[k], st.pop(amax), signed)
        elif ours and not saved:
            if not st[k].is_floating_point():
                raise ValueError(f"{where}: loaded {k} has dtype {st[k].dtype}; expected floating point or uint8")
            st[k], st[amax] = quant.quantize_tensor(st[k].detach().float(), signed)
    if "kahan_comp" in mine and "kahan_comp" not in st:
        # no compensation saved (an fp32-master run): start it at zero -- at most half a bf16 ulp is lost, once.
        # (Not master - param: the param may not be loaded yet, and the result would depend on the order.)
        st["kahan_comp"] = torch.zeros(p.shape, dtype=p.dtype, device=p.device)
    if "master" not in mine:
        st.pop("master", None)
    if "kahan_comp" not in mine:
        st.pop("kahan_comp", None)  # a master, if this optimizer keeps one, is re-read from the loaded param
    return st
