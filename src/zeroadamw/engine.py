"""Gradient hooks and communication scheduling: everything between ``backward()`` and the update math.

The optimizer (:mod:`zeroadamw.sharded_adamw`) owns the hyperparameters and the update, the buckets
(:mod:`zeroadamw.buckets`) own the flat buffers; this module decides when each bucket's gradients land, are
reduced and are finished:

* :class:`~zeroadamw.buckets.Bucket` (:mod:`zeroadamw.buckets`) -- a few parameters of one param group packed
  into one flat, padded buffer, and this rank's shard of it.
* :class:`GradEngine` -- turns per-parameter gradients into reduced, sharded gradients:

  - **stage 2** (``N > 1``): a post-accumulate-grad hook copies each gradient into its bucket's flat buffer and
    frees ``param.grad``; a bucket whose gradients have all landed is reduce-scattered at once (async), in a fixed
    bucket order that every rank shares; at the end of every backward the buckets that did not fill (a parameter
    unused on this rank) are sent anyway, with zeros for the missing gradients, so every rank issues the same
    collectives in the same order whatever its control flow. At most ``max_inflight`` full-size buckets are in
    flight, plus the one filling (3 by default); the reduced 1/N shard is accumulated (over backward passes) in
    ``Bucket.shard_grad``.
  - **stage 1** (``N > 1``): gradients stay in ``param.grad`` until ``step()``, then are packed and
    reduce-scattered bucket by bucket (or, with ``grads_reduced=True``, used as they are: DDP already averaged
    them).
  - **one process**: no buffers and no collectives; the update reads ``param.grad`` directly.
  - **step in backward** (any ``N``): as stage 2, but every backward reduces (``no_sync()`` then only means "not
    the last micro-batch": gradients accumulate in the fp32 1/N shard); with ``N = 1`` gradients land straight
    in the fp32 accumulator. In *fused* mode (no clipping) a bucket of the last micro-batch is updated the moment
    its reduce-scatter completes -- the optimizer's ``apply_fn`` -- and its all-gather starts at once; its
    gradient memory is freed right there. Collectives issued while finishing a bucket follow a fixed, count-based
    schedule (never "whichever finished first"), so every rank issues them in the same order.

  After the update, :meth:`Bucket.gather_params` all-gathers each bucket's updated shard so every rank holds
  identical weights.
"""

from __future__ import annotations

import sys
import weakref
from collections import deque
from typing import Iterable

import torch
from torch import Tensor

from .buckets import Bucket, BufferPool, _flat
from .comm import Handle
from .gathers import DeferredGathers

__all__ = ["GradEngine"]


class GradEngine:
    """Gradient reduction for all buckets of one optimizer (see the module docstring).

    Errors found on one rank (a bad gradient, a gradient that arrives twice) are *recorded*, not raised, while
    collectives are in progress: the rank keeps taking part (contributing zeros), and ``step()`` raises on every
    rank together after its control all-reduce. Raising on one rank alone would leave the others waiting forever.
    """

    def __init__(self, stage: int, grads_reduced: bool, max_inflight: int = 2, step_in_backward: bool = False) -> None:
        self.stage = stage
        self.grads_reduced = grads_reduced
        self.max_inflight = max_inflight
        self.step_in_backward = step_in_backward
        self.apply_fn = None  # fused step in backward: optimizer callback(agreement) -> all-gather Handle or None
        self.agree_fn = None  # fused step in backward: optimizer callback(bucket) -> agreement in flight
        self._agree_q: deque = deque()  # buckets whose agreement all-reduce is in flight (applied in order)
        self.control = None  # the optimizer's control plane (zeroadamw.control.Control), set by the optimizer
        self.on_moved = None  # optimizer callback(bucket) after a bucket followed its params to another device
        self._callback_queued = False  # an end-of-backward callback is queued on the outermost backward
        self._nested_tasks: dict[int, bool] = {}  # graph task id -> runs inside another backward (reentrant)
        self.release_check = None  # optimizer callback: True when it no longer owns its params' gradients
        self._final = False  # the current backward round is the last micro-batch (outside no_sync())
        self._ag_inflight: deque[Handle] = deque()
        self.buckets: list[Bucket] = []  # update order
        self.hooked_buckets: list[Bucket] = []  # launch order of the buckets reduced in backward; same on all ranks
        self.where: dict[Tensor, tuple[Bucket, int]] = {}
        self.pool = BufferPool()  # gradient buffers reused every step (buckets take and give back)
        self.gathers = DeferredGathers(self.where)  # overlap_param_gather: all-gathers left for the next forward
        self._hooks: list = []
        self._finalizer = weakref.finalize(self, _remove_handles, self._hooks)
        self._no_sync = 0
        self._round_active = False
        self._next = 0
        self._inflight: deque[Bucket] = deque()
        self.rounds = 0  # backward passes reduced since the last step
        self.errors: list[tuple[type, str]] = []
        self.packed_at_step = False  # gradients were taken from param.grad at step() (GradScaler saw them)
        # Launch order: buckets are built in reverse parameter order, which matches backward only roughly (param
        # groups interleave). The first backward logs the order buckets actually fill on each rank; at the first
        # step every rank adopts rank 0's log (as DDP rebuilds its buckets after the first iteration). Later, a
        # bucket that had to be flushed at the end of a backward on any rank (a param without a gradient there)
        # moves to the end of the order, so it stops holding back the buckets behind it.
        self._fill_log: list[Bucket] | None = []
        self._order: list[int] | None = None
        self._reordered = False
        self._reduced = False  # reduce() ran and nothing arrived since: calling it again is a no-op
        # peak bytes of full-size gradient buffers alive at once (stage 2 memory claim, checked by tests), and of
        # all gradient memory the engine holds (full buffers + reduced shards; step in backward's claim)
        self.full_bytes = 0
        self.peak_full_bytes = 0
        self.shard_bytes = 0
        self.peak_grad_bytes = 0

    # --------------------------------------------------------------------------------------------- building
    def add_bucket(self, bucket: Bucket) -> None:
        direct = (self.step_in_backward or bucket.always_hooked) and bucket.comm.dp_size == 1
        if bucket.direct != direct:
            raise RuntimeError(f"internal: {bucket!r} is {'' if bucket.direct else 'not '}a DirectBucket, but this "
                               "engine reduces it " + ("in one process in backward" if direct else "with collectives"))
        bucket.tracker = self
        bucket.pool = self.pool
        bucket.on_moved = self.on_moved
        self.buckets.append(bucket)
        for i, p in enumerate(bucket.params):
            self.where[p] = (bucket, i)
        if self.hooked(bucket):
            self.hooked_buckets.append(bucket)
            ref = weakref.ref(self)
            for p in bucket.params:
                self._hooks.append(p.register_post_accumulate_grad_hook(lambda p, ref=ref: _hook(ref, p)))

    def hooked(self, bucket: Bucket) -> bool:
        """Stage 2 over several ranks and step-in-backward reduce during backward; the rest read ``param.grad``.
        (Row-sharded buckets -- SparseAdamW -- always reduce in backward.)"""
        return bucket.always_hooked or self.step_in_backward or (self.stage == 2 and bucket.comm.dp_size > 1)

    def sharded(self, bucket: Bucket) -> bool:
        """Whether the update reads ``bucket.shard_grad`` (else: slices of ``param.grad``)."""
        return self.hooked(bucket) or (bucket.comm.dp_size > 1 and not self.grads_reduced)

    @property
    def fused(self) -> bool:
        return self.apply_fn is not None

    def reset_peak(self) -> None:
        """Restart the peak counts of gradient memory (e.g. after the first step settled the bucket order)."""
        self.peak_full_bytes = self.full_bytes
        self.peak_grad_bytes = self.full_bytes + self.shard_bytes

    def remove_hooks(self) -> None:
        _remove_handles(self._hooks)
        self.gathers.remove_hook()

    def error(self, exc_type: type, msg: str) -> None:
        if (exc_type, msg) not in self.errors:
            self.errors.append((exc_type, msg))

    # ------------------------------------------------------------------------------------------- no_sync()
    def enter_no_sync(self) -> None:
        self._no_sync += 1

    def exit_no_sync(self) -> None:
        self._no_sync -= 1

    # ------------------------------------------------------------------------------------- stage 2 (hooks)
    def on_grad(self, p: Tensor) -> None:
        if self._no_sync and not self.step_in_backward:
            return
        if not self._round_active and self.release_check is not None and self.release_check():
            return  # the optimizer went plain (something else partitions): hooks removed, param.grad left alone
        self._reduced = False
        bucket, i = self.where[p]
        grad = p.grad
        if grad is None:
            self.error(RuntimeError, "a gradient hook found param.grad already consumed: two optimizers are hooked on the same "
                       "parameters (delete the old ShardedAdamW, or call old.engine.remove_hooks())")
            return
        if grad.device != bucket.device:
            bucket.to_device(grad.device)  # the model moved after the optimizer was built (e.g. accelerate)
        if not self._round_active:
            self._round_active = True
            self._final = False
        if not self._callback_queued:
            self._queue_end_of_backward()
        if not self._no_sync:
            self._final = True  # a backward outside no_sync(): the last micro-batch, update once reduced
        if bucket.launched:
            self.error(RuntimeError, "a parameter's gradient arrived twice in one backward, after its bucket was already "
                       "reduced (a trainable param used both inside and outside a reentrant activation checkpoint?); "
                       "use torch.utils.checkpoint with use_reentrant=False")
            p.grad = None
            return
        problem = bucket.check(p, grad)
        if problem is not None:
            self.error(*problem)
            p.grad = None
            return
        was_pending = bucket.pending
        bucket.land(i, grad)
        p.grad = None
        if was_pending and bucket.pending == 0 and self._fill_log is not None:
            self._fill_log.append(bucket)
        self._launch_ready()

    def _queue_end_of_backward(self) -> None:
        """Queue :meth:`_backward_done` on the *outermost* backward. A hook that fires inside a reentrant
        activation checkpoint (``torch.utils.checkpoint(use_reentrant=True)`` runs a nested backward) must not
        queue it there: that callback would run when the segment ends, flushing every bucket not yet filled and
        dropping the gradients that arrive after. So a nested backward queues nothing; the next hook of the outer
        backward queues the callback (and if every hook is nested, ``step()`` ends the round)."""
        task = torch._C._current_graph_task_id()
        nested = self._nested_tasks.get(task)
        if nested is None:
            if len(self._nested_tasks) > 64:
                self._nested_tasks.clear()
            nested = self._nested_tasks[task] = _inside_nested_backward()
        if nested:
            return
        self._callback_queued = True
        torch.autograd.Variable._execution_engine.queue_callback(self._backward_done)

    def _count_full(self, delta: int) -> None:
        self.full_bytes += delta
        self.peak_full_bytes = max(self.peak_full_bytes, self.full_bytes)
        self.peak_grad_bytes = max(self.peak_grad_bytes, self.full_bytes + self.shard_bytes)

    def _count_shard(self, delta: int) -> None:
        self.shard_bytes += delta
        self.peak_grad_bytes = max(self.peak_grad_bytes, self.full_bytes + self.shard_bytes)

    def _launch(self, bucket: Bucket) -> None:
        bucket.launch()
        if bucket.direct:  # one process: nothing in flight, finish (and, fused, update) right away
            self._finish(bucket)
            return
        self._inflight.append(bucket)
        # free full-size buffers as soon as their collective is done; block only past max_inflight. When finishing
        # a bucket issues collectives (fused step in backward), finish on a fixed count only -- never "whichever
        # completed first", which differs between ranks.
        while self._inflight and (
            len(self._inflight) > self.max_inflight
            or (not (self.fused and self._final) and self._inflight[0].handle is not None and self._inflight[0].handle.done())
        ):
            self._finish(self._inflight.popleft())

    def _finish(self, bucket: Bucket) -> None:
        bucket.finish()
        if self.fused and self._final and not bucket.applied:
            # start the bucket's small agreement all-reduce now and apply it max_inflight buckets later (a fixed
            # count, the same on every rank: applying issues the all-gather), so it overlaps the rest of backward
            bucket.applied = True
            self._agree_q.append(self.agree_fn(bucket))
            while self._agree_q and (len(self._agree_q) > self.max_inflight or bucket.comm.dp_size == 1):
                self._apply_next()

    def _apply_next(self) -> None:
        agreement = self._agree_q.popleft()
        if agreement is not None:
            self.gathers.wait(agreement[0])  # last step's gather of this bucket lands before its update
        handle = self.apply_fn(agreement)
        if handle is not None:
            handle = self.gathers.keep(agreement[0], handle)
        if handle is not None:
            self._ag_inflight.append(handle)
        while self._ag_inflight and (len(self._ag_inflight) > self.max_inflight or self._ag_inflight[0].done()):
            self._ag_inflight.popleft().wait()

    def _launch_ready(self) -> None:
        hooked = self.hooked_buckets
        while self._next < len(hooked) and hooked[self._next].pending == 0:
            self._launch(hooked[self._next])
            self._next += 1

    def _backward_done(self) -> None:
        """End of a backward pass: send the buckets that did not fill, wait for everything, start a new round."""
        hooked = self.hooked_buckets
        for bucket in hooked[self._next :]:
            self._pack_leftovers(bucket)
            bucket.flushed = bucket.flushed or bucket.pending > 0
            bucket.fill_missing()
            self._launch(bucket)
        self._drain()
        self._drain_gathers()
        self._end_round()
        self._callback_queued = False
        if self._fill_log is not None:
            self._fill_log += [b for b in hooked if b not in self._fill_log]
            self._order = [hooked.index(b) for b in self._fill_log]
            self._fill_log = None

    def _end_round(self) -> None:
        for bucket in self.hooked_buckets:
            bucket.reset_round()
        self._next = 0
        self._round_active = False
        self._final = False
        self.rounds += 1

    def _adopt_fill_order(self) -> None:
        """Once, at the first step after a backward: every rank launches buckets in rank 0's fill order."""
        if self._reordered or self._order is None or not self.hooked_buckets:
            return
        n = len(self.hooked_buckets)
        order = self._order + [i for i in range(n) if i not in self._order]  # buckets added since the log
        # over the optimizer's world group: every rank -- whatever expert group it is in -- adopts one order
        perm = self.control.broadcast_order(order)
        if sorted(perm) != list(range(n)):
            raise RuntimeError(f"bucket order from rank 0 is not a permutation of {n} buckets: {perm}")
        self.hooked_buckets = [self.hooked_buckets[i] for i in perm]
        self._reordered = True
        self.pool.clear()  # the first backward's buffers piled up behind the unordered launch: regrow in order

    def flushed_flags(self) -> list[float]:
        """Per launch-order bucket: had to be sent at the end of a backward on this rank since the last step."""
        return [float(b.flushed) for b in self.hooked_buckets]

    def demote(self, flushed_anywhere: list[bool]) -> None:
        """Move buckets that some rank had to flush to the end of the launch order (stable; same on all ranks)."""
        if not any(flushed_anywhere) or all(flushed_anywhere):
            return
        keep = [b for b, f in zip(self.hooked_buckets, flushed_anywhere) if not f]
        late = [b for b, f in zip(self.hooked_buckets, flushed_anywhere) if f]
        self.hooked_buckets = keep + late

    def _pack_leftovers(self, bucket: Bucket) -> None:
        """Gradients left in ``param.grad`` (from backward passes run under ``no_sync()``) join this round."""
        for i, p in enumerate(bucket.params):
            if not bucket.landed[i] and p.grad is not None:
                problem = bucket.check(p, p.grad)
                if problem is not None:
                    self.error(*problem)
                    p.grad = None
                    continue
                bucket.land(i, p.grad)
                p.grad = None

    def _drain(self, apply: bool = True) -> None:
        while self._inflight:
            self._finish(self._inflight.popleft())
        while self._agree_q:
            if apply:
                self._apply_next()
            else:  # forgetting this step (clear()): complete the collective, update nothing
                self._agree_q.popleft()[-1].wait()

    def _drain_gathers(self) -> None:
        while self._ag_inflight:
            self._ag_inflight.popleft().wait()

    # ---------------------------------------------------------------------------------------- step: reduce
    def reduce(self) -> None:
        """Make every bucket's averaged gradient available to the update (called at the start of ``step``).

        Idempotent until the next backward or :meth:`clear`.
        """
        if self._reduced:
            return
        for bucket in self.buckets:
            if bucket in self.gathers:
                if bucket.applied:  # updated in backward (fused): its gather is left for the next forward
                    continue
                self.gathers.wait(bucket)  # the update reads the params (and a replaced p.data is looked for below)
            dev = bucket.params[0].device
            if dev != bucket.device:
                bucket.to_device(dev)
            problem = bucket.rebind_if_replaced()  # params as views: p.data replaced since (same dtype: bind again)
            if problem is not None:
                self.error(*problem)
        if self.hooked_buckets:
            if self._round_active:  # step() called from inside backward (should not happen); finish the round
                self._backward_done()
            self._drain()
            hooked = self.hooked_buckets
            if any(p.grad is not None for b in hooked for p in b.params):
                # backward ran only under no_sync() since the last step: reduce what accumulated in param.grad
                self._check_not_rewritten(hooked)
                self.packed_at_step = True
                self._final = False  # reduced at step(): the optimizer's step() applies it
                for bucket in hooked:
                    self._pack_leftovers(bucket)
                    bucket.fill_missing()
                    self._launch(bucket)
                self._drain()
                self._end_round()
                if self._fill_log is not None:  # no hook ever fired: keep the built order
                    self._order = list(range(len(hooked)))
                    self._fill_log = None
            self._adopt_fill_order()
        for bucket in self.buckets:
            if self.hooked(bucket):
                continue
            if not self.sharded(bucket):  # one process, or gradients already averaged by DDP
                for i, p in enumerate(bucket.params):
                    if p.grad is not None:
                        problem = bucket.check(p, p.grad)
                        if problem is not None:
                            self.error(*problem)
                        else:
                            bucket.present[i] = True
                continue
            # stage 1 over several ranks: pack param.grad and reduce-scatter now
            self.packed_at_step = True
            bucket.full = bucket._alloc_full()
            for i, p in enumerate(bucket.params):
                s = bucket.layout.slots[i]
                dst = bucket.full[s.offset : s.offset + s.numel]
                problem = None if p.grad is None else bucket.check(p, p.grad)
                if problem is not None:
                    self.error(*problem)
                if p.grad is None or problem is not None:
                    dst.zero_()
                else:
                    dst.copy_(_flat(p.grad))
                    bucket.present[i] = True
            self._launch(bucket)
        self._drain()
        self._reduced = True

    def _check_not_rewritten(self, hooked: Iterable[Bucket]) -> None:
        if self.rounds == 0:
            return
        for bucket in hooked:
            for i, p in enumerate(bucket.params):
                if bucket.present[i] and p.grad is not None:
                    self.error(ValueError,
                        "stage=2 frees param.grad as soon as it has copied the gradient, but a gradient was "
                        "written back after that. The model is probably wrapped in DistributedDataParallel: "
                        "stage 2 reduces gradients itself, so don't wrap the model in DDP (or use stage=1 with "
                        "grads_reduced=True). Running backward under no_sync() *after* the last synced backward "
                        "of a step also causes this: the synced backward must be the last one."
                    )
                    return

    def grad_views(self, bucket: Bucket, indices: list[int]) -> list[Tensor]:
        """The averaged gradient of the owned part of each parameter ``indices`` of ``bucket``."""
        if self.sharded(bucket):
            return bucket.reduced_views(indices)
        out = []
        for i in indices:
            s = bucket.layout.slots[i]
            out.append(_flat(bucket.params[i].grad)[s.own_lo : s.own_hi])
        return out

    def clear(self) -> None:
        """Forget every gradient held (sharded or in flight) and any half-finished backward round."""
        self._reduced = False
        self._final = False
        self._drain(apply=False)
        self._drain_gathers()
        for bucket in self.buckets:
            bucket.clear_grads()
        self.rounds = 0
        self.full_bytes = 0
        self.shard_bytes = 0
        self._next = 0
        self._round_active = False  # a backward that raised never ran its end-of-backward callback
        self._callback_queued = False
        self.errors.clear()
        self.packed_at_step = False



def _remove_handles(handles: list) -> None:
    for h in handles:
        h.remove()
    handles.clear()


_AUTOGRAD_ENTRIES = {("backward", "torch/autograd/__init__.py"), ("grad", "torch/autograd/__init__.py")}


def _inside_nested_backward() -> bool:
    """Whether the current autograd hook runs in a backward started from inside another backward: a
    ``torch.autograd.backward``/``grad`` call above (more recent than) a custom autograd Function's backward
    (``BackwardCFunction.apply``), as reentrant activation checkpointing does. Walks this thread's Python stack
    (the engine runs CUDA work on its own threads: there the outer backward has no Python frame, the nested
    one still does)."""
    f = sys._getframe(1)
    seen_entry = False
    while f is not None:
        code = f.f_code
        path = code.co_filename.replace("\\", "/")
        if not seen_entry and any(code.co_name == n and path.endswith(suffix) for n, suffix in _AUTOGRAD_ENTRIES):
            seen_entry = True
        elif seen_entry and code.co_name == "apply" and path.endswith("torch/autograd/function.py"):
            return True
        f = f.f_back
    return False


def _hook(ref: weakref.ref, p: Tensor) -> None:
    engine = ref()
    if engine is not None:
        engine.on_grad(p)
