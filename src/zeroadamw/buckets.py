"""Buckets: a few parameters of one param group packed into one flat, padded buffer, and this rank's shard of it.

A :class:`Bucket` is the unit of communication and of optimizer state. Its gradient side (the full-size buffer
that is reduce-scattered, the reduced 1/N ``shard_grad``, or -- one process, step in backward -- the gradients
kept per parameter, :class:`DirectBucket`) is driven by :class:`zeroadamw.engine.GradEngine`; its state side (flat
``exp_avg`` / ``exp_avg_sq`` / ``master`` over the owned shard, of which ``optimizer.state[p]`` holds views) by
the optimizer (:mod:`zeroadamw.state`). :func:`dense_buckets` is how both sharded optimizers pack a param group
(SparseAdamW adds its row-sharded :class:`zeroadamw.sparse_adamw.RowBucket`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import quant, storage
from .comm import Comm, Handle
from .layout import BucketLayout, plan_buckets

__all__ = ["Bucket", "BufferPool", "DirectBucket", "check_grad", "dense_buckets", "master_dtype_for", "trainable"]


def _flat(t: Tensor) -> Tensor:
    return t.view(-1) if t.is_contiguous() else t.reshape(-1)


def _nbytes(t: Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


class BufferPool:
    """Flat buffers reused from step to step instead of allocated and freed per bucket and per step.

    A bucket takes a buffer when it needs one (the full-size gradient buffer, the reduce-scatter's output and
    scratch) and gives it back when its collective is done. A request gets the smallest free buffer of its kind
    that is large enough (a view of its first ``numel`` elements). When none is, the pool allocates -- and, if
    a free buffer of that kind exists (too small), drops it: so a kind never holds more buffers than were *in
    use at once* (``peak_in_use``; about ``max_inflight`` + 1 full-size buckets in stage 2), each no larger than
    the largest request, and with the same requests every step it stops changing after a step or two. Then
    neither glibc's heap nor CUDA's caching allocator is left holding dead gradient buckets, and no buffer is
    faulted in again every step (``MALLOC_MMAP_THRESHOLD_``). ``bytes`` is what the pool holds.
    """

    def __init__(self) -> None:
        self.free: dict[tuple[str, torch.dtype, torch.device], list[Tensor]] = {}
        self._mine: dict[int, str] = {}  # id of each buffer this pool allocated -> its kind
        self.bytes = 0
        self.in_use: dict[str, int] = {}
        self.peak_in_use: dict[str, int] = {}

    def take(self, numel: int, dtype: torch.dtype, device: torch.device, kind: str = "") -> Tensor:
        """A buffer of ``numel`` elements (contents undefined). ``kind`` keeps buffers of different uses apart
        (full-size gradients, scratch, reduced shards)."""
        free = self.free.setdefault((kind, dtype, torch.device(device)), [])
        fits = [j for j, b in enumerate(free) if b.numel() >= numel]
        if fits:
            base = free.pop(min(fits, key=lambda j: free[j].numel()))
        else:
            if free:  # every free one is too small: replace the largest (the count of buffers does not grow)
                old = free.pop(max(range(len(free)), key=lambda j: free[j].numel()))
                del self._mine[id(old)]
                self.bytes -= _nbytes(old)
                del old
            base = torch.empty(numel, dtype=dtype, device=device)
            self._mine[id(base)] = kind
            self.bytes += _nbytes(base)
        self.in_use[kind] = self.in_use.get(kind, 0) + 1
        self.peak_in_use[kind] = max(self.peak_in_use.get(kind, 0), self.in_use[kind])
        return base[:numel]

    def give(self, t: Tensor | None) -> None:
        """Return a buffer from :meth:`take` (anything else is ignored: left to the allocator)."""
        if t is None:
            return
        base = t._base if t._base is not None else t
        kind = self._mine.get(id(base))
        if kind is not None:
            free = self.free.setdefault((kind, base.dtype, base.device), [])
            if not any(b is base for b in free):
                free.append(base)
                self.in_use[kind] -= 1

    def held(self, kind: str) -> list[Tensor]:
        """The free buffers of ``kind`` (all of them, between steps)."""
        return [b for (k, _, _), bufs in self.free.items() if k == kind for b in bufs]

    def clear(self) -> None:
        """Drop the free buffers (after the model moved to another device; after the first step, whose unordered
        launches held more buffers than any later step). Buffers in use stay counted."""
        for bufs in self.free.values():
            for b in bufs:
                self._mine.pop(id(b), None)
                self.bytes -= _nbytes(b)
        self.free.clear()
        self.peak_in_use = dict(self.in_use)


class _Counted:
    """A gradient-buffer attribute of a bucket whose bytes the engine (``bucket.tracker``) counts as it changes."""

    def __init__(self, slot: str, counter: str) -> None:
        self.slot, self.counter = slot, counter

    def __get__(self, bucket, owner=None):
        return self if bucket is None else getattr(bucket, self.slot)

    def __set__(self, bucket, t: Tensor | None) -> None:
        old = getattr(bucket, self.slot)
        if bucket.tracker is not None and old is not t:
            getattr(bucket.tracker, self.counter)(_nbytes(t) - _nbytes(old))
        setattr(bucket, self.slot, t)


class Bucket:
    """Parameters of one group packed into one flat buffer, and this rank's shard of it."""

    always_hooked = False  # reduce in backward hooks whatever the stage (row-sharded buckets)
    direct = False  # DirectBucket: one process, reduced in backward -- gradients kept per parameter, no buffers

    def __init__(
        self,
        params: list[Tensor],
        group_index: int,
        comm: Comm,
        reduce_dtype: torch.dtype,
        acc_dtype: torch.dtype,
        master_dtype: torch.dtype | None,
        unit: int = 1,
        moments: torch.dtype | str | None = None,
        kahan: bool = False,
    ) -> None:
        self.params = params
        self.group_index = group_index
        self.comm = comm
        # int8 moments: params start on quantization-block boundaries and shards are cut on them (quant.py)
        align = quant.BLOCK if moments == "int8" else 1
        self.layout = BucketLayout([p.numel() for p in params], comm.world_size, comm.rank, unit=unit, align=align)
        self.dtype = params[0].dtype
        self.device = params[0].device
        self.reduce_dtype = reduce_dtype
        self.acc_dtype = acc_dtype
        self.master_dtype = master_dtype  # None: params are updated in their own dtype
        # storage of the moments (zeroadamw.storage): a float dtype or "int8"; Kahan compensation instead of a master
        self.moments = moments if moments is not None else (master_dtype or self.dtype)
        self.kahan = bool(kahan) and master_dtype is None and self.dtype in (torch.float16, torch.bfloat16)
        # backward-round bookkeeping (stage 2)
        self.tracker = None  # the engine: counts gradient memory as buffers come and go
        self._full: Tensor | None = None  # padded flat gradient buffer, alive until its reduce-scatter is done
        self.full_nbytes = self.layout.padded * torch.empty((), dtype=reduce_dtype).element_size()
        self.launched = False  # reduce-scatter of this round started
        self.flushed = False  # had to be sent at the end of a backward, unfilled, since the last step
        self.landed = [False] * len(params)
        self.pending = len(params)
        self.rs_out: Tensor | None = None
        self.handle: Handle | None = None
        self.applied = False  # updated during backward this step (fused step-in-backward)
        # reduced, averaged gradient of the owned shard (accumulated over backward passes until step)
        self._shard_grad: Tensor | None = None
        self.present = [False] * len(params)  # got a gradient on this rank since the last step
        # optimizer state of the owned shard (flat); optimizer.state[p] holds views into these
        self.exp_avg: Tensor | None = None  # float moments, or uint8 codes (int8)
        self.exp_avg_sq: Tensor | None = None
        self.exp_avg_absmax: Tensor | None = None  # int8: one fp32 scale per 256-element block
        self.exp_avg_sq_absmax: Tensor | None = None
        self.master: Tensor | None = None
        self.kahan_comp: Tensor | None = None  # Kahan: what the low-precision weights could not hold
        self.on_moved = None  # optimizer callback(bucket) after to_device: re-bind optimizer.state views
        self.pool: BufferPool | None = None  # set by the engine: where gradient buffers come from and go back
        self.scratch: Tensor | None = None  # the reduce-scatter's receive buffer (gloo point-to-point)
        # params as views of one flat, padded buffer (bind_params): the all-gather writes them in place
        self.flat: Tensor | None = None
        self._bound: list[int] = []  # the params' data pointers when bound (a changed one: p.data was replaced)

    full = _Counted("_full", "_count_full")  # padded flat gradient buffer, alive until its reduce-scatter is done
    shard_grad = _Counted("_shard_grad", "_count_shard")  # reduced, averaged gradient of the owned shard

    # ------------------------------------------------------------------------------------------------- views
    @property
    def numel(self) -> int:
        return self.layout.numel

    def owned_param_view(self, i: int) -> Tensor:
        s = self.layout.slots[i]
        return _flat(self.params[i].detach())[s.own_lo : s.own_hi]

    def check(self, p: Tensor, grad: Tensor) -> tuple[type, str] | None:
        return check_grad(p, grad)

    def owned_grad_or_zeros(self, i: int) -> Tensor:
        """The owned part of ``param.grad`` (one process / DDP-averaged), or zeros of that size when it has none."""
        s = self.layout.slots[i]
        g = self.params[i].grad
        if g is None:
            return torch.zeros(s.owned, dtype=self.dtype, device=self.device)
        return _flat(g)[s.own_lo : s.own_hi]

    def shard_view(self, flat: Tensor, i: int) -> Tensor:
        s = self.layout.slots[i]
        return flat[s.shard_lo : s.shard_lo + s.owned]

    def target_view(self, i: int) -> Tensor:
        """What the update writes for the owned part of param ``i``: its master slice, or the param itself."""
        return self.shard_view(self.master, i) if self.master is not None else self.owned_param_view(i)

    # -------------------------------------------------------------------------------------------- gradients
    def _take(self, numel: int, dtype: torch.dtype, kind: str) -> Tensor:
        if self.pool is None:
            return torch.empty(numel, dtype=dtype, device=self.device)
        return self.pool.take(numel, dtype, self.device, kind)

    def _give(self, *ts: Tensor | None) -> None:
        if self.pool is not None:
            for t in ts:
                self.pool.give(t)

    def _alloc_full(self, zero: bool = False) -> Tensor:
        full = self._take(self.layout.padded, self.reduce_dtype, "full")
        if zero:
            full.zero_()
            return full
        if self.layout.padding:
            full[self.layout.numel :].zero_()
        for lo, hi in self.layout.gaps:  # block-aligned params: the padding between them is reduced too
            full[lo:hi].zero_()
        return full

    def land(self, i: int, grad: Tensor) -> None:
        """Copy parameter ``i``'s gradient into the flat buffer (adds if it already landed this round)."""
        if self.full is None:
            self.full = self._alloc_full()
        s = self.layout.slots[i]
        dst = self.full[s.offset : s.offset + s.numel]
        if self.landed[i]:
            dst.add_(_flat(grad))
        else:
            dst.copy_(_flat(grad))
        self._mark_landed(i)

    def _mark_landed(self, i: int) -> None:
        """Param ``i`` has its gradient for this round (and got one since the last step)."""
        if not self.landed[i]:
            self.landed[i] = True
            self.pending -= 1
        self.present[i] = True

    def fill_missing(self) -> None:
        """Zero the slots of parameters that have not landed this round (so they contribute nothing)."""
        if self.full is None:
            self.full = self._alloc_full(zero=True)
            return
        for i, s in enumerate(self.layout.slots):
            if not self.landed[i]:
                self.full[s.offset : s.offset + s.numel].zero_()

    def launch(self) -> None:
        n = self.comm.dp_size  # every rank that averages these gradients (a mesh: replicate x shard)
        if self.reduce_dtype == torch.float16:
            self.full.div_(n)  # fp16: average before summing, as DDP does, so the sum cannot overflow
        self.rs_out = self._take(self.layout.shard, self.reduce_dtype, "shard")
        need = self.comm.scratch_numel(self.full)
        self.scratch = self._take(need, self.reduce_dtype, "scratch") if need else None
        self.handle = self.comm.reduce_scatter(self.rs_out, self.full, async_op=True, scratch=self.scratch)
        self.launched = True

    def finish(self) -> None:
        """Wait for the reduce-scatter, average, accumulate into ``shard_grad`` and free the full buffer."""
        self.handle.wait()
        out = self.rs_out
        full, scratch = self.full, self.scratch
        self.full = self.scratch = self.handle = self.rs_out = None
        self._give(full, scratch)
        average = self.reduce_dtype != torch.float16  # fp16 was averaged before summing (launch)
        if out.dtype != self.acc_dtype:  # e.g. bf16 reduced, fp32 accumulated: average in the wider of the two
            narrowing = torch.finfo(self.acc_dtype).eps > torch.finfo(out.dtype).eps
            if average and narrowing:
                out.div_(self.comm.dp_size)
            o = self._take(self.layout.shard, self.acc_dtype, "shard").copy_(out)
            self._give(out)
            average = average and not narrowing
        else:
            o = out
        if average:
            o.div_(self.comm.dp_size)
        if self.shard_grad is None:
            self.shard_grad = o  # a pooled buffer: back to the pool at release_grads
        else:
            self.shard_grad.add_(o)
            self._give(o)

    def reset_round(self) -> None:
        self.landed = [False] * len(self.params)
        self.pending = len(self.params)
        self.launched = False

    def reduced_grads(self) -> list[Tensor]:
        """The averaged gradient this bucket holds for its owned shard, as flat tensors."""
        return [] if self.shard_grad is None else [self.shard_grad]

    def reduced_views(self, indices: list[int]) -> list[Tensor]:
        """The averaged gradient of the owned part of each parameter ``indices`` (views of ``shard_grad``)."""
        return [self.shard_view(self.shard_grad, i) for i in indices]

    def release_grads(self) -> None:
        """Free the reduced gradient (after the update used it): back to the pool."""
        g = self.shard_grad
        self.shard_grad = None
        self._give(g)

    def clear_grads(self) -> None:
        self.release_grads()
        if self.handle is None:
            self._give(self.full, self.rs_out, self.scratch)
        # else: a collective still in flight (a backward that raised): its buffers are dropped, not reused
        self.full = self.rs_out = self.scratch = self.handle = None
        self.present = [False] * len(self.params)
        self.flushed = False
        self.applied = False
        self.reset_round()

    # ------------------------------------------------------------------------------------------------- state
    STATE_NAMES = ("exp_avg", "exp_avg_sq", "exp_avg_absmax", "exp_avg_sq_absmax", "master", "kahan_comp")

    def state_bytes(self) -> int:
        """Every byte of this bucket's flat state: moments (codes and scales), master, compensation."""
        return sum(_nbytes(getattr(self, k)) for k in self.STATE_NAMES)

    def init_state(self, moments: bool = True) -> None:
        """Allocate the owned shard's flat state: Adam moments (``moments``, stored as :attr:`moments` says), the
        master copy (low precision) or the Kahan compensation."""
        S = self.layout.shard
        kw = dict(device=self.device)
        if moments and self.moments == "int8":
            quant.dynamic_map(True, self.device), quant.dynamic_map(False, self.device)  # tables now, not in a hook
            self.exp_avg = torch.full((S,), quant.zero_code(True), dtype=torch.uint8, **kw)
            self.exp_avg_sq = torch.full((S,), quant.zero_code(False), dtype=torch.uint8, **kw)
            self.exp_avg_absmax = torch.zeros(S // quant.BLOCK, dtype=torch.float32, **kw)
            self.exp_avg_sq_absmax = torch.zeros(S // quant.BLOCK, dtype=torch.float32, **kw)
        elif moments:
            self.exp_avg = torch.zeros(S, dtype=self.moments, **kw)
            self.exp_avg_sq = torch.zeros(S, dtype=self.moments, **kw)
        if self.kahan:
            self.kahan_comp = torch.zeros(S, dtype=self.dtype, **kw)
        if self.master_dtype is not None:
            self.master = torch.zeros(S, dtype=self.master_dtype, device=self.device)
            for i, s in enumerate(self.layout.slots):
                if s.owned:
                    self.shard_view(self.master, i).copy_(self.owned_param_view(i))

    def to_device(self, device: torch.device) -> None:
        """Follow the parameters to another device (e.g. the model was moved after the optimizer was built); the
        optimizer's ``on_moved`` callback then re-binds its per-param state to the moved tensors."""
        if device == self.device:
            return
        self.device = device
        for name in (*self.STATE_NAMES, "shard_grad", "full", "rs_out", "scratch"):
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, t.to(device))
        if self.pool is not None:
            self.pool.clear()
        if self.flat is not None:  # the moved params are new tensors: views of a flat buffer on the new device
            self.bind_params()
        if self.on_moved is not None:
            self.on_moved(self)

    # ------------------------------------------------------------------------------------ params as views
    def bind_params(self) -> None:
        """Make the params views of one flat, padded buffer (``self.flat``) holding their current values, so
        that :meth:`gather_params` all-gathers straight into them: no output buffer, no copy out. A parameter
        whose ``.data`` is replaced later (``p.data = t``, ``model.to(...)``) is found by
        :meth:`rebind_if_replaced` and bound again."""
        flat = torch.zeros(self.layout.padded, dtype=self.dtype, device=self.device)
        for p, s in zip(self.params, self.layout.slots):
            flat[s.offset : s.offset + s.numel].copy_(_flat(p.detach()))
        for p, s in zip(self.params, self.layout.slots):
            p.data = flat[s.offset : s.offset + s.numel].view(p.shape)
        self.flat = flat
        self._bound = [p.data_ptr() for p in self.params]

    def rebind_if_replaced(self) -> tuple[type, str] | None:
        """A parameter's ``.data`` was replaced since :meth:`bind_params` (same dtype and device: bind again,
        keeping the new values). Returns the problem when it cannot be bound (its dtype changed)."""
        if self.flat is None or all(p.data_ptr() == ptr for p, ptr in zip(self.params, self._bound)):
            return None
        for p in self.params:
            if p.dtype != self.dtype:
                return ValueError, (
                    f"a parameter's dtype changed from {self.dtype} to {p.dtype} after the optimizer was built "
                    "(model.to(dtype) / .half()?); convert the model first, then build the optimizer")
        if any(p.device != self.device for p in self.params):
            return None  # a device move: to_device binds on the new device (reduce() moves it first)
        self.bind_params()
        return None

    def gather_params(self, indices: list[int]) -> Handle | None:
        """Start the all-gather of this bucket's updated shard (the master rounded to the param dtype, or the owned
        param slices); the returned handle writes params ``indices`` when waited on. One process: copy the master
        back into the params, no collective."""
        if self.comm.world_size == 1:
            if self.master is not None:
                for i in indices:
                    self.owned_param_view(i).copy_(self.shard_view(self.master, i))
            return None
        if self.flat is not None:  # params are views of self.flat: gather in place
            problem = self.rebind_if_replaced()  # p.data replaced since the last step (the update wrote the new one)
            if problem is not None and self.tracker is not None:
                self.tracker.error(*problem)
            lo, hi = self.layout.owner_range(self.layout.rank)
            mine = self.flat[lo:hi]
            if self.master is not None:  # only the params updated this step (a stale master is never written)
                own = [i for i in indices if self.layout.slots[i].owned]
                if own:
                    torch._foreach_copy_([self.shard_view(mine, i) for i in own],
                                         [self.shard_view(self.master, i) for i in own])
            params = self.params
            # the collective writes behind autograd's back: bump the params' versions as an in-place copy would
            # (on every rank alike), so a graph that saved them before the step still raises when reused
            return Handle(self.comm.all_gather(self.flat, mine, async_op=True),
                          lambda: torch.autograd.graph.increment_version(params))
        if self.master is not None:
            send = self.master.to(self.dtype)
        else:
            send = torch.zeros(self.layout.shard, dtype=self.dtype, device=self.device)
            for i, s in enumerate(self.layout.slots):
                if s.owned:
                    self.shard_view(send, i).copy_(self.owned_param_view(i))
        out = torch.empty(self.layout.padded, dtype=self.dtype, device=self.device)
        h = self.comm.all_gather(out, send, async_op=True)
        slots = [self.layout.slots[i] for i in indices]
        dsts = [_flat(self.params[i].detach()) for i in indices]

        def unpack() -> None:
            srcs = [out[s.offset : s.offset + s.numel] for s in slots]
            torch._foreach_copy_(dsts, srcs)

        return Handle(h, unpack)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(group={self.group_index}, dtype={self.dtype}, {self.layout})"


class DirectBucket(Bucket):
    """A bucket of one process that reduces in backward (step in backward; SparseAdamW's rows): nothing to
    reduce, so the gradients are kept per parameter -- autograd's tensors themselves when they already have the
    accumulation dtype (no copy) -- and the "reduced shard" is those tensors."""

    direct = True

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if self.comm.dp_size != 1:
            raise RuntimeError("DirectBucket is for one process (nothing to reduce)")
        self.direct_grads: list[Tensor | None] = [None] * len(self.params)

    def land(self, i: int, grad: Tensor) -> None:
        held = self.direct_grads[i]
        if held is None:
            held = _flat(grad) if grad.dtype == self.acc_dtype else _flat(grad).to(self.acc_dtype)
            self.direct_grads[i] = held
            if self.tracker is not None:
                self.tracker._count_shard(held.numel() * held.element_size())
        else:
            held.add_(_flat(grad))
        self._mark_landed(i)

    def fill_missing(self) -> None:
        pass  # a missing gradient is simply absent

    def launch(self) -> None:
        self.launched = True

    def finish(self) -> None:
        pass

    def reduced_grads(self) -> list[Tensor]:
        return [g for g in self.direct_grads if g is not None]

    def reduced_views(self, indices: list[int]) -> list[Tensor]:
        out = []
        for i in indices:  # a param without a gradient here (present on no rank is never asked for): zeros
            g = self.direct_grads[i]
            out.append(g if g is not None else torch.zeros(self.params[i].numel(), dtype=self.acc_dtype,
                                                           device=self.device))
        return out

    def release_grads(self) -> None:
        freed = sum(g.numel() * g.element_size() for g in self.direct_grads if g is not None)
        if self.tracker is not None and freed:
            self.tracker._count_shard(-freed)
        self.direct_grads = [None] * len(self.params)
        super().release_grads()

    def to_device(self, device: torch.device) -> None:
        self.direct_grads = [None if g is None else g.to(device) for g in self.direct_grads]
        super().to_device(device)


def check_grad(p: Tensor, grad: Tensor) -> tuple[type, str] | None:
    """What is wrong with a gradient the dense update cannot take, as (exception type, message naming the fix)."""
    if grad.is_sparse or grad.layout != torch.strided:
        return TypeError, (
            "ShardedAdamW got a sparse gradient (e.g. from nn.Embedding(sparse=True)); it updates dense "
            "gradients only -- build the embedding with sparse=False"
        )
    if grad.shape != p.shape:
        return ValueError, f"gradient shape {tuple(grad.shape)} does not match its parameter's shape {tuple(p.shape)}"
    if grad.dtype != p.dtype:
        return ValueError, (
            f"gradient dtype {grad.dtype} does not match its parameter's dtype {p.dtype}; "
            "assign gradients of the parameter's dtype (autograd always does)"
        )
    if grad.device != p.device:
        return ValueError, f"gradient is on {grad.device} but its parameter is on {p.device}"
    return None


def master_dtype_for(dtype: torch.dtype, master_dtype: torch.dtype | None) -> torch.dtype | None:
    """The dtype of the master copy kept for params of ``dtype``: ``master_dtype`` for bf16/fp16 params (unless it
    is None or the param dtype itself), else None (updated in place, in their own dtype)."""
    if dtype in (torch.float16, torch.bfloat16) and master_dtype not in (None, dtype):
        return master_dtype
    return None


def trainable(params: list[Tensor]) -> list[Tensor]:
    """The params of a group that get buckets and state, in reverse registration order (about the order backward
    produces their gradients): trainable and not empty."""
    return [p for p in params if p.requires_grad and p.numel() > 0][::-1]


def dense_buckets(params: list[Tensor], group_index: int, comm: Comm, bucket_size: int,
                  master_dtype: torch.dtype | None, reduce_dtype: torch.dtype | None,
                  in_backward: bool = False, state_dtype: str | None = None,
                  kahan: bool = False) -> tuple[list[Bucket], list]:
    """Pack the trainable params of one param group into buckets of about ``bucket_size`` elements, one dtype per
    bucket, in reverse registration order (about the order backward produces gradients). ``in_backward``: they
    are reduced in backward hooks (step in backward) -- in one process that makes them :class:`DirectBucket`.
    ``state_dtype="int8"``: params of at least ``quant.MIN_QUANTIZED_NUMEL`` elements get int8 buckets of their
    own, the smaller ones fp32 moments (:mod:`zeroadamw.storage`).
    Returns the buckets and their layout signature entries (what every rank must build identically)."""
    cls = DirectBucket if in_backward and comm.dp_size == 1 else Bucket
    by_kind: dict[tuple, list[Tensor]] = {}
    for p in trainable(params):
        moments_of = state_dtype if state_dtype != "int8" or p.numel() >= quant.MIN_QUANTIZED_NUMEL else "fp32"
        by_kind.setdefault((p.dtype, moments_of), []).append(p)
    buckets, signature = [], []
    for (dtype, sd), ps in by_kind.items():
        master = master_dtype_for(dtype, master_dtype)
        moments = storage.moment_dtype(sd, dtype, master, kahan and master is None)
        acc = storage.acc_dtype(dtype, master, kahan and master is None)
        for idx in plan_buckets([p.numel() for p in ps], bucket_size):
            buckets.append(cls([ps[i] for i in idx], group_index, comm, reduce_dtype or dtype, acc,
                               master, moments=moments, kahan=kahan))
            signature.append((str(dtype), str(moments), [ps[i].numel() for i in idx]))
    return buckets, signature
