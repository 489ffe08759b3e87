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

from .comm import Comm, Handle
from .layout import BucketLayout, plan_buckets

__all__ = ["Bucket", "DirectBucket", "check_grad", "dense_buckets", "master_dtype_for", "trainable"]


def _flat(t: Tensor) -> Tensor:
    return t.view(-1) if t.is_contiguous() else t.reshape(-1)


def _nbytes(t: Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


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
    ) -> None:
        self.params = params
        self.group_index = group_index
        self.comm = comm
        self.layout = BucketLayout([p.numel() for p in params], comm.world_size, comm.rank, unit=unit)
        self.dtype = params[0].dtype
        self.device = params[0].device
        self.reduce_dtype = reduce_dtype
        self.acc_dtype = acc_dtype
        self.master_dtype = master_dtype  # None: params are updated in their own dtype
        self.state_dtype = master_dtype or self.dtype
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
        self.exp_avg: Tensor | None = None
        self.exp_avg_sq: Tensor | None = None
        self.master: Tensor | None = None
        self.on_moved = None  # optimizer callback(bucket) after to_device: re-bind optimizer.state views

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
    def _alloc_full(self) -> Tensor:
        full = torch.empty(self.layout.padded, dtype=self.reduce_dtype, device=self.device)
        if self.layout.padding:
            full[self.layout.numel :].zero_()
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
            self.full = torch.zeros(self.layout.padded, dtype=self.reduce_dtype, device=self.device)
            return
        for i, s in enumerate(self.layout.slots):
            if not self.landed[i]:
                self.full[s.offset : s.offset + s.numel].zero_()

    def launch(self) -> None:
        n = self.comm.world_size
        if self.reduce_dtype == torch.float16:
            self.full.div_(n)  # fp16: average before summing, as DDP does, so the sum cannot overflow
        self.rs_out = torch.empty(self.layout.shard, dtype=self.reduce_dtype, device=self.device)
        self.handle = self.comm.reduce_scatter(self.rs_out, self.full, async_op=True)
        self.launched = True

    def finish(self) -> None:
        """Wait for the reduce-scatter, average, accumulate into ``shard_grad`` and free the full buffer."""
        self.handle.wait()
        out = self.rs_out
        if self.reduce_dtype != torch.float16:
            out = out.to(self.acc_dtype).div_(self.comm.world_size)
        else:
            out = out.to(self.acc_dtype)
        if self.shard_grad is None:
            self.shard_grad = out
        else:
            self.shard_grad.add_(out)
        self.full = self.rs_out = self.handle = None

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
        """Free the reduced gradient (after the update used it)."""
        self.shard_grad = None

    def clear_grads(self) -> None:
        self.release_grads()
        self.full = self.rs_out = self.handle = None
        self.present = [False] * len(self.params)
        self.flushed = False
        self.applied = False
        self.reset_round()

    # ------------------------------------------------------------------------------------------------- state
    def state_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.exp_avg, self.exp_avg_sq, self.master) if t is not None)

    def init_state(self, moments: bool = True) -> None:
        """Allocate the owned shard's flat state: Adam moments (``moments``) and the master copy (low precision)."""
        S = self.layout.shard
        if moments:
            self.exp_avg = torch.zeros(S, dtype=self.state_dtype, device=self.device)
            self.exp_avg_sq = torch.zeros(S, dtype=self.state_dtype, device=self.device)
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
        for name in ("exp_avg", "exp_avg_sq", "master", "shard_grad", "full"):
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, t.to(device))
        if self.on_moved is not None:
            self.on_moved(self)

    def gather_params(self, indices: list[int]) -> Handle | None:
        """Start the all-gather of this bucket's updated shard (the master rounded to the param dtype, or the owned
        param slices); the returned handle writes params ``indices`` when waited on. One process: copy the master
        back into the params, no collective."""
        if self.comm.world_size == 1:
            if self.master is not None:
                for i in indices:
                    self.owned_param_view(i).copy_(self.shard_view(self.master, i))
            return None
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
        if self.comm.world_size != 1:
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
                  in_backward: bool = False) -> tuple[list[Bucket], list]:
    """Pack the trainable params of one param group into buckets of about ``bucket_size`` elements, one dtype per
    bucket, in reverse registration order (about the order backward produces gradients). ``in_backward``: they
    are reduced in backward hooks (step in backward) -- in one process that makes them :class:`DirectBucket`.
    Returns the buckets and their layout signature entries (what every rank must build identically)."""
    cls = DirectBucket if in_backward and comm.world_size == 1 else Bucket
    by_dtype: dict[torch.dtype, list[Tensor]] = {}
    for p in trainable(params):
        by_dtype.setdefault(p.dtype, []).append(p)
    buckets, signature = [], []
    for dtype, ps in by_dtype.items():
        master = master_dtype_for(dtype, master_dtype)
        for idx in plan_buckets([p.numel() for p in ps], bucket_size):
            buckets.append(cls([ps[i] for i in idx], group_index, comm, reduce_dtype or dtype, master or dtype,
                               master))
            signature.append((str(dtype), [ps[i].numel() for i in idx]))
    return buckets, signature
