"""The fused step in backward: each bucket updated the moment its reduced gradient exists (LOMO's memory saving).

With ``step_in_backward=True`` and no ``max_grad_norm``, the engine (:mod:`zeroadamw.engine`) calls back here for
every bucket of the last micro-batch, in a fixed order on every rank:

1. :meth:`InBackwardMixin._agree_in_backward` -- the bucket's reduce-scatter is done: start one small async
   all-reduce of ``[presence per param, non-finite flag]`` (the result stays on the device);
2. :meth:`InBackwardMixin._apply_in_backward`, a fixed number of buckets later -- update the owned shard with
   the agreed flags on the device (the kernel's ``found_inf`` skips a non-finite bucket, no host read), start the
   all-gather, free the gradient.

The per-group squared norms and the count of skipped buckets accumulate on the device and are read in
``step()``'s one packed control read (:mod:`zeroadamw.agree`). Rules that are not element-wise (AdaLomo) read
their per-parameter scalars on the host: one read per bucket.

:class:`InBackwardMixin` holds these methods of :class:`~zeroadamw.ShardedAdamW`.
"""

from __future__ import annotations

import weakref

import torch
from torch import Tensor

from .buckets import Bucket
from .functional import sum_of_squares

__all__ = ["InBackwardMixin", "engine_callbacks"]


def engine_callbacks(opt):
    """The engine's fused-update callbacks ``(apply, agree)``, holding the optimizer weakly (no reference cycle
    through the gradient hooks)."""
    ref = weakref.ref(opt)

    def agree(bucket):
        o = ref()
        return None if o is None else o._agree_in_backward(bucket)

    def apply(agreement):
        o = ref()
        if agreement is not None:
            agreement[-1].wait()
        return None if o is None or agreement is None else o._apply_in_backward(*agreement)

    return apply, agree


class InBackwardMixin:
    def _agree_in_backward(self, bucket: Bucket):
        """Fused step in backward, phase 1: ``bucket``'s reduced gradient of the last micro-batch is ready -- start
        the agreement with the other ranks on which of its params got a gradient and whether it is finite (one
        small async all-reduce whose result stays on the device). The engine applies it a fixed number of buckets
        later (:meth:`_apply_in_backward`), so the all-reduce overlaps the rest of backward."""
        held = bucket.reduced_grads()
        sq = sum_of_squares(held, bucket.device)
        ctl = self.control
        world = bucket.comm.world  # presence and finiteness: agreed by every rank holding this bucket (all rows)
        cdev = ctl.device_for(world)
        flags = torch.cat([ctl.host_vector(bucket.present, torch.float32, cdev),
                           (~torch.isfinite(sq)).to(device=cdev, dtype=torch.float32).reshape(1)])
        return bucket, sq, flags, ctl.all_reduce_packed(flags, comm=world, async_op=True)

    def _apply_in_backward(self, bucket: Bucket, sq: Tensor, flags: Tensor, _handle=None):
        """Phase 2 (the agreement has arrived): update the owned shard now (a non-finite bucket is skipped by the
        kernel's ``found_inf``, on the device), and start the all-gather. No host read. Returns the gather
        handle."""
        n = len(bucket.params)
        dev = bucket.device
        flags = flags.to(dev)
        bad = (flags[n] > 0).to(torch.float32)
        if self._applied_sq is None:
            self._applied_sq = torch.zeros(len(self.param_groups), dtype=torch.float64, device=dev)
            self._applied_bad = torch.zeros((), dtype=torch.float64, device=dev)
        elif len(self._applied_sq) < len(self.param_groups):
            self._applied_sq = torch.cat([self._applied_sq, self._applied_sq.new_zeros(
                len(self.param_groups) - len(self._applied_sq))])
        if bucket.comm.counts_norm:  # a mesh: one row's shards make the norm
            self._applied_sq[bucket.group_index] += sq
        self._applied_bad += bad
        if not self._state_ready:
            self._init_state()
        if not self._resume_checked:
            self._warn_if_resumed_without_state()
        if not self._rule.elementwise:  # AdaLomo: its per-parameter scalars are read on the host, once per bucket
            present = (flags[:n] > 0).tolist()
            if bad.item() or not any(present):
                bucket.release_grads()
                return None
            self._update_bucket(bucket, present, None)
            handle = bucket.gather_params([i for i in range(n) if present[i]])
        else:
            self._update_bucket_masked(bucket, flags[:n], bad)
            handle = bucket.gather_params(list(range(n)))
        bucket.release_grads()  # the gradient memory goes right here
        return handle

    def _update_bucket_masked(self, bucket: Bucket, counts: Tensor, bad: Tensor) -> None:
        """The update of :meth:`_update_bucket` with presence and finiteness known only on the device: params
        this rank saw a gradient for (so present everywhere) share one kernel call skipped by ``bad``; the others
        (rare: unused here) get one call each, skipped when no rank had a gradient either."""
        group = self.param_groups[bucket.group_index]
        here = [i for i in range(len(bucket.params)) if bucket.present[i]]
        elsewhere = [i for i in range(len(bucket.params)) if not bucket.present[i]]
        calls = [(here, bad)] if here else []
        if elsewhere:
            absent = torch.logical_or(bad > 0, counts == 0).to(torch.float32)
            calls += [([i], absent[i]) for i in elsewhere]
        for idx, skip in calls:
            owned = [i for i in idx if bucket.layout.slots[i].owned]
            lonely = [self.state[bucket.params[i]]["step"] for i in idx if not bucket.layout.slots[i].owned]
            if lonely:  # present somewhere, none of it owned here: keep the replicated step count in sync
                torch._foreach_add_(lonely, [1.0 - skip] * len(lonely))
            if owned:
                self._kernel(bucket, owned, group, None, skip)
