"""Optimizer state of the sharded optimizers: where it lives, how it is made, moved, described and reset.

Per bucket (:mod:`zeroadamw.buckets`) the state of the owned shard is flat: ``exp_avg`` / ``exp_avg_sq`` (rules
with flat moments) and ``master`` (the fp32 copy of bf16/fp16 params); ``optimizer.state[p]`` holds views of
them, ``step``, and whatever else the rule keeps (:meth:`zeroadamw.rules.Rule.init_param_state`). State is made
lazily at the first update (params may change between construction and then: a master is re-read from its param
at its first update -- ``_master_stale``), follows the params when the model moves device, and is described per
kind (:meth:`StateMixin._state_kinds`) for ``state_dict`` and :mod:`zeroadamw.checkpoint`.

:class:`StateMixin` holds these methods of :class:`~zeroadamw.ShardedAdamW` (and SparseAdamW, which adds per-row
kinds); it keeps no attributes of its own.
"""

from __future__ import annotations

import sys
import warnings

import torch
from torch import Tensor

from . import quant, storage
from .buckets import Bucket
from .options import lr_max

__all__ = ["StateMixin"]


class StateMixin:
    # ------------------------------------------------------------------------------------------------ making
    def _init_state(self) -> None:
        if self._state_ready:
            return
        for bucket in self.engine.buckets:
            self._init_bucket_state(bucket)
        self._state_ready = True

    def _init_bucket_state(self, bucket: Bucket) -> None:
        bucket.init_state(moments=self._rule.flat_moments)
        for i, p in enumerate(bucket.params):
            st: dict[str, Tensor] = {"step": torch.zeros((), dtype=torch.float32, device=p.device)}
            st.update(self._rule.init_param_state(bucket, i))
            if bucket.master is not None:
                st["master"] = bucket.shard_view(bucket.master, i)
                self._master_stale.add(p)  # re-read from the param at its first update (weights may change before)
            st.update(self._flat_views(bucket, i, ("exp_avg_absmax", "exp_avg_sq_absmax", "kahan_comp")))
            self.state[p] = st

    @staticmethod
    def _flat_views(bucket: Bucket, i: int, names) -> dict[str, Tensor]:
        """``state[p]`` views of the bucket's flat state ``names`` that it holds: owned elements, or for the int8
        scales the owned blocks (``own_lo // 256`` up to the block of ``own_hi``)."""
        out = {}
        for k in names:
            flat = getattr(bucket, k, None)
            if flat is None:
                continue
            if k.endswith("_absmax"):
                lo, hi, _ = storage.padded_range(bucket, i)
                out[k] = flat[lo // quant.BLOCK : hi // quant.BLOCK]
            else:
                out[k] = bucket.shard_view(flat, i)
        return out

    def _kernel(self, bucket: Bucket, idx: list[int], group: dict, grad_scale: Tensor | None,
                found_inf: Tensor | None) -> None:
        """The (element-wise) rule's kernel over the owned parts of params ``idx`` of ``bucket``, on the fp32
        working tensors of its storage (:mod:`zeroadamw.storage`: views where the storage is fp32, copies
        otherwise, written back after), with one keyword set for every rule (:meth:`zeroadamw.rules.Rule.kernel`)."""
        self._refresh_master(bucket, idx)
        w = storage.working(bucket, idx, self._rule.flat_moments)
        grads = self.engine.grad_views(bucket, idx)
        if grads and grads[0].dtype != w.targets[0].dtype:
            grads = [g.to(w.targets[0].dtype) for g in grads]
        steps = [self.state[bucket.params[i]]["step"] for i in idx]
        common = dict(lr=float(group["lr"]), weight_decay=group["weight_decay"], decay=group["decay"],
                      lr_max=lr_max(group), grad_scale=grad_scale, found_inf=found_inf)
        self._rule.kernel(w.targets, grads, steps, (w.exp_avgs, w.exp_avg_sqs), idx, group, common, self.impl)
        storage.store(bucket, idx, w, found_inf, steps=steps)

    def _refresh_master(self, bucket: Bucket, idx: list[int]) -> None:
        """First update since the state was made (or loaded without a master): copy params ``idx`` into the master."""
        if bucket.master is None or not self._master_stale:
            return
        for i in idx:
            p = bucket.params[i]
            if p in self._master_stale:
                if bucket.layout.slots[i].owned:
                    bucket.shard_view(bucket.master, i).copy_(bucket.owned_param_view(i))
                self._master_stale.discard(p)

    def _reset_param_state(self, p: Tensor) -> None:
        """Fresh state for ``p`` (trainable now, never stepped in what was loaded): zero moments and steps, master
        re-read from the param. Shared by ``load_state_dict`` and :func:`zeroadamw.checkpoint.load`."""
        for kind, (_, t) in self._state_kinds(p).items():
            if kind == "master":
                self._master_stale.add(p)
            elif t.dtype == torch.uint8:  # int8 codes: the code of 0.0 (not code 0 in the signed map)
                t.fill_(quant.zero_code(kind == "exp_avg"))
            else:
                t.zero_()

    def _master_loaded(self, p: Tensor, loaded: bool) -> None:
        """``p``'s master was (``loaded``) or was not (saved from an fp32 run) in the loaded state: keep it, or
        re-read it from the (loaded) param at the next update."""
        if loaded:
            self._master_stale.discard(p)
        else:
            self._master_stale.add(p)

    def _mark_state_loaded(self) -> None:
        """Called by zeroadamw.checkpoint.load (load_state_dict sets the flag when it loads stepped state): the
        state is a resumed one, not fresh -- the resume warning is off."""
        self._state_loaded = True
        self._resume_checked = True

    # ------------------------------------------------------------------------------------------------ moving
    def _bind_params(self, buckets: list[Bucket]) -> None:
        """Params as views of their buckets' flat buffers (``param_views``; several ranks: the all-gather then
        writes them in place). One process gathers nothing: its params stay as they are."""
        if self.param_views:
            for bucket in buckets:
                if bucket.comm.world_size > 1 and not bucket.direct:
                    bucket.bind_params()

    def _relocate_if_needed(self) -> None:
        """The model moved after the optimizer was built: buckets, state and control tensors follow it (the
        engine does the same when a moved gradient arrives first; either way :meth:`_on_bucket_moved` runs)."""
        for bucket in self.engine.buckets:
            dev = bucket.params[0].device
            if dev != bucket.device:
                self.engine.gathers.wait_all()  # nothing may land in the buffers being left behind
                bucket.to_device(dev)

    def _on_bucket_moved(self, bucket: Bucket) -> None:
        """Re-bind ``self.state`` of a bucket that moved device: views of its flat state again, the rest moved."""
        dev = bucket.device
        self._device = dev
        if self._control is not None:
            self._control.follow(dev)
        for name in ("_applied_sq", "_applied_bad"):
            t = getattr(self, name)
            if t is not None and t.device != dev:
                setattr(self, name, t.to(dev))
        for i, p in enumerate(bucket.params):
            st = self.state.get(p)
            if not st:
                continue
            flat = self._flat_views(bucket, i, Bucket.STATE_NAMES)
            for k, t in list(st.items()):
                # a view of the bucket's flat state when the bucket holds that kind flat (rules without flat
                # moments -- AdaLomo's own exp_avg_sq -- leave bucket.exp_avg_sq None: their tensor is moved)
                if k in flat:
                    st[k] = flat[k]
                elif isinstance(t, Tensor) and t.device != dev:
                    st[k] = t.to(dev)

    # ------------------------------------------------------------------------------------------- describing
    def state_bytes(self) -> int:
        """Bytes of optimizer state this rank holds: ``exp_avg`` + ``exp_avg_sq`` (+ master) of its shard (AdamW);
        the factored / sharded second moments (+ master) for AdaLomo; the master for LOMO."""
        if self._plain:  # DeepSpeed's client / FSDP2's shards: torch-style per-param state
            from .plain import state_bytes

            return state_bytes(self.state)
        return sum(b.state_bytes() for b in self.engine.buckets) + self._rule.extra_state_bytes(self.state)

    def _state_kinds(self, p: Tensor) -> dict[str, tuple[str, Tensor]]:
        """This rank's state of ``p`` by kind, and how it is laid out across ranks:

        * ``("range", t)`` -- the owned elements ``own_lo:own_hi`` of a tensor shaped like ``p`` (sharded);
        * ``("rows", t)`` -- the owned rows ``rows_lo:rows_hi`` of a ``[p.shape[0]]`` tensor (row-sharded params'
          per-row step counts, SparseAdamW);
        * ``("full", t)`` -- a whole tensor every rank holds identically;
        * ``("scalar", t)`` -- a 0-d tensor every rank holds identically (the step count);
        * ``("blocks", t)`` -- the owned 256-element blocks of a ``[ceil(numel / 256)]`` tensor (int8 moments'
          scales: params start on block boundaries and shards are cut on them).
        """
        return {k: ("blocks" if k.endswith("_absmax") else self._rule.layout_of(k), t)
                for k, t in self.state[p].items()}

    @staticmethod
    def _state_shape(p: Tensor, how: str, t: Tensor) -> tuple[int, ...]:
        """The consolidated (whole-model) shape of a state kind of ``p``."""
        if how == "range":
            return tuple(p.shape)
        if how == "rows":
            return (p.shape[0],)
        if how == "blocks":
            return (quant.nblocks(p.numel()),)
        return tuple(t.shape)

    @staticmethod
    def _rows_range(bucket: Bucket, i: int) -> tuple[int, int]:
        p, s = bucket.params[i], bucket.layout.slots[i]
        d = p.numel() // p.shape[0]
        return s.own_lo // d, s.own_hi // d

    # ------------------------------------------------------------------------------------------------ resume
    def _warn_if_resumed_without_state(self) -> None:
        """zeroadamw.checkpoint.load(model=..., optimizer=None) marks the params of a model restored from a
        checkpoint that had optimizer state. Starting AdamW fresh there (zero moments, step 1 bias correction
        on weights trained for thousands of steps) is the classic resume bug: say so, loudly, once. (Host-side
        flags only: this runs at the first update, possibly inside backward.)"""
        self._resume_checked = True
        resumed = [getattr(p, "_zeroadamw_resumed_step", 0) for b in self.engine.buckets for p in b.params]
        step = max(resumed, default=0)
        if step > 0 and not self._state_loaded:
            msg = (
                f"zeroadamw: this model was restored from a checkpoint saved at optimizer step {step:g}, but the "
                "optimizer starts with FRESH state (zero moments). Resuming like this usually makes training "
                "diverge. Load the optimizer too: zeroadamw.checkpoint.load(path, model=model, optimizer=opt)."
            )
            warnings.warn(msg, UserWarning, stacklevel=3)
            print("WARNING " + msg, file=sys.stderr, flush=True)
        for b in self.engine.buckets:
            for p in b.params:
                if hasattr(p, "_zeroadamw_resumed_step"):
                    delattr(p, "_zeroadamw_resumed_step")
