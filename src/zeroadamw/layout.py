"""FlatLayout: where every parameter element lives in the flat communication buckets.

Pure metadata, no tensors and no ``torch.distributed``: given parameter sizes, a bucket size and a world size,
decide

* which parameters share a bucket (params are packed whole, in the order given -- the optimizer passes them in
  reverse registration order, which approximates the order gradients appear in backward);
* each bucket's padded size (a multiple of the world size, so every rank owns the same number of elements);
* for every rank, the contiguous range of each bucket it owns, and for every parameter the part of it that falls
  in that range (``own_lo:own_hi`` in the flattened parameter, ``shard_lo`` in the rank's shard).

A bucket of ``n`` real elements is padded to ``ceil(n / N) * N``: fewer than ``N`` padding elements per bucket.
(Row-sharded buckets -- SparseAdamW's ``sparse="rows"`` -- use ``unit`` = the row size, so every rank owns whole
rows: fewer than ``N`` padding *rows*.) Buckets of block-quantized state (``align`` = 256) start every parameter
on a multiple of ``align`` and cut shards on multiples of it, so quantization blocks follow each parameter's own
element index at every world size; the gaps between params (``gaps``) are padding too.
Rank ``r`` owns ``[r * S, (r + 1) * S)`` of every bucket, ``S = padded / N``. Every element of every parameter is
owned by exactly one rank (tests/test_layout.py checks this with hypothesis).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["Slot", "BucketLayout", "plan_buckets"]


@dataclass(frozen=True)
class Slot:
    """One parameter's place in a bucket, and the part of it the local rank owns."""

    index: int  # position of the parameter in the bucket
    offset: int  # first element of the parameter in the bucket's flat buffer
    numel: int
    own_lo: int  # first owned element, counted in the flattened parameter
    own_hi: int  # one past the last owned element (own_lo == own_hi: this rank owns none of it)
    shard_lo: int  # where element ``own_lo`` sits in the rank's shard

    @property
    def owned(self) -> int:
        return self.own_hi - self.own_lo


class BucketLayout:
    """Offsets, padding and the owned range of one bucket for one rank."""

    __slots__ = ("numel", "padded", "shard", "world_size", "rank", "slots", "gaps", "align")

    def __init__(self, numels: list[int], world_size: int, rank: int, unit: int = 1, align: int = 1) -> None:
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside [0, {world_size})")
        if not numels:
            raise ValueError("a bucket needs at least one parameter")
        if unit < 1 or align < 1:
            raise ValueError(f"unit and align must be >= 1, got {unit}, {align}")
        offsets, gaps, end = [], [], 0
        for n in numels:
            start = -(-end // align) * align
            if start > end:
                gaps.append((end, start))
            offsets.append(start)
            end = start + n
        self.numel = end  # the last param's end (with align > 1: real elements + gaps)
        self.gaps = tuple(gaps)
        self.align = align
        self.world_size = world_size
        self.rank = rank
        # every shard is a whole number of units (rows, for row-sharded params) and of align: ceil(numel / (N * unit))
        unit = unit * align // math.gcd(unit, align)
        self.shard = -(-self.numel // (world_size * unit)) * unit
        self.padded = self.shard * world_size
        lo, hi = rank * self.shard, (rank + 1) * self.shard
        slots = []
        for i, (n, offset) in enumerate(zip(numels, offsets)):
            a, b = max(offset, lo), min(offset + n, hi)
            if a < b:
                slots.append(Slot(i, offset, n, a - offset, b - offset, a - lo))
            else:
                slots.append(Slot(i, offset, n, 0, 0, 0))
        self.slots = tuple(slots)

    @property
    def padding(self) -> int:
        return self.padded - self.numel

    def owner_range(self, rank: int) -> tuple[int, int]:
        """The ``[lo, hi)`` element range of this bucket that ``rank`` owns."""
        return rank * self.shard, (rank + 1) * self.shard

    def __repr__(self) -> str:
        return (
            f"BucketLayout(params={len(self.slots)}, numel={self.numel}, padded={self.padded}, "
            f"shard={self.shard}, rank={self.rank}/{self.world_size})"
        )


def plan_buckets(numels: list[int], bucket_size: int) -> list[list[int]]:
    """Split parameter indices ``0..len(numels)-1`` into consecutive buckets of about ``bucket_size`` elements.

    A bucket takes parameters while it stays within ``bucket_size`` elements; a parameter is never split, so a
    parameter larger than ``bucket_size`` gets a bucket of its own.
    """
    if bucket_size < 1:
        raise ValueError(f"bucket_size must be a positive number of elements, got {bucket_size}")
    buckets: list[list[int]] = []
    current: list[int] = []
    size = 0
    for i, n in enumerate(numels):
        if current and size + n > bucket_size:
            buckets.append(current)
            current, size = [], 0
        current.append(i)
        size += n
    if current:
        buckets.append(current)
    return buckets
