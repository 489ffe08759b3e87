r"""Block-wise 8-bit dynamic quantization of optimizer moments (Dettmers et al., 2022, "8-bit Optimizers via
Block-wise Quantization").

A tensor is cut into blocks of :data:`BLOCK` (256) consecutive elements; each block keeps its absolute maximum
(fp32) and one byte per element: the index of the nearest value of a 256-entry *dynamic map* to
``x / absmax``. The dynamic map spreads its values over seven decades (an exponent, then a linear fraction), so
small and large moments both keep about two significant digits:

* :func:`dynamic_map` ``(signed=True)`` for ``exp_avg`` (values in ``[-0.993, 1]``, 0 exact);
* :func:`dynamic_map` ``(signed=False)`` for ``exp_avg_sq`` (values in ``[0, 1]``, 0 exact).

These are the maps of bitsandbytes' 8-bit Adam (``create_dynamic_map``; tests/test_precision.py checks them
equal when bitsandbytes is installed). Blocks follow the *parameter's own element index*: the buckets of int8
state start every parameter on a block boundary and cut shards on block boundaries (:mod:`zeroadamw.layout`'s
``align``), so a parameter has the same codes and scales at every world size and bucket size, and resharding
a checkpoint moves codes and scales unchanged.

**Underflow guard.** ``exp_avg_sq`` spans the square of the gradients' range: in a block that also holds large
values, an element whose ``v`` is below ~1.6e-7 of the block's maximum quantizes to 0 while its ``m`` (relative
size ~4e-4) does not, and the update ``m / (sqrt(0) + eps)`` would be ``m / eps`` -- the blow-up 8-bit Adam is
known for on rarely-updated rows (bitsandbytes recommends its StableEmbedding for it). :func:`guard_underflow`
zeroes ``m`` wherever the dequantized ``v`` is 0: that element restarts from its current gradient (an update of
at most ``(1 - beta1) / sqrt(1 - beta2)`` times the lr) instead of dividing by ``eps``.

Pure tensor functions, no host reads: they run on the device, per bucket, around the fp32 update math.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

__all__ = ["BLOCK", "MIN_QUANTIZED_NUMEL", "dynamic_map", "zero_code", "quantize", "dequantize", "nblocks",
           "quantize_tensor", "dequantize_tensor", "guard_underflow", "stochastic_bf16"]

BLOCK = 256
# Smaller tensors (biases, norm weights) keep fp32 moments: too few bytes to matter, and the most sensitive
# (bitsandbytes' ``min_8bit_size`` is the same 4096).
MIN_QUANTIZED_NUMEL = 4096


def nblocks(numel: int) -> int:
    return -(-numel // BLOCK)


@functools.lru_cache(maxsize=None)
def _map_values(signed: bool) -> tuple[float, ...]:
    """The 256 values of the dynamic map, ascending: for exponent ``i`` in 0..6, the midpoints of a linear grid
    on [0.1, 1] with 2**i (signed: and their negatives) or 2**(i+1) (unsigned) points, times 10**(i-6); plus 0
    and 1."""
    values: list[float] = []
    for i in range(7):
        n = 2**i if signed else 2 ** (i + 1)
        grid = torch.linspace(0.1, 1, n + 1, dtype=torch.float32)
        means = ((grid[:-1] + grid[1:]) / 2.0) * (10 ** (i - 6))
        values += means.tolist()
        if signed:
            values += (-means).tolist()
    values += [0.0, 1.0]
    return tuple(sorted(values))


_CACHE: dict[tuple[bool, torch.device], tuple[Tensor, ...]] = {}


def dynamic_map(signed: bool, device: torch.device | str = "cpu") -> Tensor:
    """The 256-entry dynamic quantization map (fp32, ascending) on ``device``."""
    return _tables(signed, torch.device(device))[0]


def _tables(signed: bool, device: torch.device) -> tuple[Tensor, ...]:
    """The map, the fp32 midpoints between its neighbours, and the two lookup tables of :func:`quantize`."""
    key = (signed, device)
    if key not in _CACHE:
        qmap = torch.tensor(_map_values(signed), dtype=torch.float32)
        mids = (qmap[1:] + qmap[:-1]) / 2
        _CACHE[key] = tuple(t.to(device) for t in (qmap, mids, *_lookup(mids)))
    return _CACHE[key]


def _lookup(mids: Tensor) -> tuple[Tensor, Tensor]:
    """Nearest-code lookup by the top 17 bits of an fp32 value (sign, exponent, 8 mantissa bits): every such
    bucket of floats spans 2**-8 of its magnitude, narrower than the map's tightest spacing (1.4 % signed,
    0.7 % unsigned, at 1.0), so it holds at most one midpoint. ``lo[j]``: the code of the bucket's smallest
    value (midpoints below it); ``thr[j]``: the midpoint inside the bucket (+inf if none). Then
    ``code(y) = lo[j] + (y > thr[j])`` is exactly ``bucketize(y, mids)``: a gather and a compare instead of a
    binary search."""
    j = torch.arange(1 << 17, dtype=torch.int64)
    mag = (j & 0xFFFF) << 15
    neg = j >= (1 << 16)
    first = mag.to(torch.int32).view(torch.float32)  # smallest magnitude in the bucket
    last = (mag + (1 << 15) - 1).to(torch.int32).view(torch.float32)
    a = torch.where(neg, -last, first).nan_to_num(nan=0.0, posinf=2.0, neginf=-2.0)  # smallest value
    b = torch.where(neg, -first, last).nan_to_num(nan=0.0, posinf=2.0, neginf=-2.0)  # largest value
    lo = torch.bucketize(a, mids)  # midpoints < a
    nxt = mids[lo.clamp(max=mids.numel() - 1)]
    thr = torch.where((lo < mids.numel()) & (nxt <= b), nxt, torch.full_like(nxt, float("inf")))
    return lo.to(torch.uint8), thr


def zero_code(signed: bool) -> int:
    """The code of 0.0 (what fresh state is filled with: for the signed map it is not code 0)."""
    return _map_values(signed).index(0.0)


def quantize(x: Tensor, codes: Tensor, absmax: Tensor, signed: bool) -> None:
    """Quantize ``x`` (fp32, ``numel`` a multiple of :data:`BLOCK`) into ``codes`` (uint8, same numel) and
    ``absmax`` (fp32, one per block), in place: per element the map value nearest to ``x / absmax`` (ties --
    exactly on an fp32 midpoint -- to the lower code), found through :func:`_lookup`'s tables."""
    _, _, lo, thr = _tables(signed, x.device)
    blocks = x.view(-1, BLOCK)
    torch.amax(blocks.abs(), dim=1, out=absmax)
    scale = torch.where(absmax > 0, absmax, 1.0).reciprocal_()
    y = blocks.mul(scale.unsqueeze(1)).view(-1)
    j = (y.view(torch.int32) >> 15).bitwise_and_(0x1FFFF)
    c = lo.index_select(0, j)
    c += y > thr.index_select(0, j)
    codes.view(-1).copy_(c)


def dequantize(codes: Tensor, absmax: Tensor, signed: bool, out: Tensor | None = None) -> Tensor:
    """fp32 values of ``codes`` (uint8, numel a multiple of :data:`BLOCK`) with per-block ``absmax``."""
    qmap = _tables(signed, codes.device)[0]
    vals = qmap.index_select(0, codes.reshape(-1).int()).view(-1, BLOCK)
    vals.mul_(absmax.unsqueeze(1))
    if out is None:
        return vals.view(-1)
    out.view(-1, BLOCK).copy_(vals)
    return out


def _hash16(index: Tensor, step: Tensor, salt: int) -> Tensor:
    """16 pseudo-random bits per element from (element index in its param, step count, salt): a counter-based
    integer hash in int32 arithmetic (products wrap mod 2**32; shifts masked to act as logical shifts), so the
    same element rounds the same way at every world size and bucket size, on any device, with no generator."""
    x = index.to(torch.int32) * 0x5BD1E995 + (step.to(torch.int32) * 0x27D4EB2F + salt)
    x = x ^ ((x >> 15) & 0x1FFFF)
    x = x * 0x2C1B3C6D
    x = x ^ ((x >> 13) & 0x7FFFF)
    return (x >> 16) & 0xFFFF


def stochastic_bf16(x: Tensor, index: Tensor, step: Tensor, salt: int) -> Tensor:
    """``x`` (fp32) rounded to bf16 stochastically: up in magnitude with probability equal to the dropped
    fraction (add 16 random bits below the kept ones, truncate), unbiased in expectation. Used for
    ``exp_avg_sq``: round-to-nearest would freeze it, since with beta2 = 0.999 the per-step change (1e-3
    relative) is below half a bf16 ulp (2**-9), so ``0.999 v`` rounds back to ``v`` and v can only grow.
    (``exp_avg`` changes by 10 % a step: round-to-nearest is fine there.) ``index``: each element's position in
    its param; ``step``: its step count (0-d, or per element)."""
    bits = x.contiguous().view(torch.int32) + _hash16(index, step, salt)
    bits = bits & -0x10000  # low 16 bits cleared: exactly representable in bf16
    return bits.view(torch.float32).view(x.shape).to(torch.bfloat16)


def guard_underflow(m: Tensor, v: Tensor) -> None:
    """In place: ``m = 0`` where the dequantized second moment ``v`` is 0 (see the module docstring)."""
    m.mul_(v.ne(0))


def quantize_tensor(x: Tensor, signed: bool) -> tuple[Tensor, Tensor]:
    """Codes (uint8, shaped like ``x``) and per-block absmax (fp32, ``[nblocks(numel)]``) of a whole tensor, its
    blocks counted from its first element: what a sharded optimizer holds for that param, at any world size."""
    n = x.numel()
    full = torch.zeros(nblocks(n) * BLOCK, dtype=torch.float32, device=x.device)
    full[:n].copy_(x.reshape(-1))
    codes = torch.empty(full.numel(), dtype=torch.uint8, device=x.device)
    absmax = torch.empty(nblocks(n), dtype=torch.float32, device=x.device)
    quantize(full, codes, absmax, signed)
    return codes[:n].view(x.shape).clone(), absmax


def dequantize_tensor(codes: Tensor, absmax: Tensor, signed: bool) -> Tensor:
    """fp32 values of a whole tensor's codes (any shape) and its per-block absmax (:func:`quantize_tensor`)."""
    n = codes.numel()
    full = torch.full((nblocks(n) * BLOCK,), zero_code(signed), dtype=torch.uint8, device=codes.device)
    full[:n].copy_(codes.reshape(-1))
    return dequantize(full, absmax.to(device=codes.device, dtype=torch.float32), signed)[:n].view(codes.shape)
