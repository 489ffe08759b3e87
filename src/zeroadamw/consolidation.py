"""Consolidated state: ``state_dict`` / ``load_state_dict`` in ``torch.optim.AdamW``'s format, and copies.

``state_dict()`` all-gathers every sharded state kind (:meth:`~zeroadamw.state.StateMixin._state_kinds`) into
whole-parameter tensors keyed by torch's param indices; ``load_state_dict()`` validates everything first (group
count and sizes, hyperparameters, every kind's shape, the rule) and only then keeps each rank's shard. A
``torch.optim.AdamW`` state dict loads too (its groups lack zeroadamw's keys: :func:`complete_loaded_state`).
``copy.deepcopy`` / ``pickle`` rebuild the optimizer from its constructor arguments and this consolidated state.

:class:`ConsolidationMixin` holds these methods of :class:`~zeroadamw.ShardedAdamW`; :mod:`zeroadamw.checkpoint`
(sharded, reshardable checkpoints) shares its validation vocabulary and the fresh-state reset
(:meth:`~zeroadamw.state.StateMixin._reset_param_state`).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor

from . import quant, storage
from .buckets import Bucket
from .options import completed_groups, steps_as_tensors, validate_hyper
from .schedules import portable_wd_fn

__all__ = ["ConsolidationMixin", "complete_loaded_state"]


def complete_loaded_state(opt: torch.optim.Optimizer, state: dict[str, Any]) -> dict[str, Any]:
    """What torch's ``load_state_dict`` hands ``__setstate__``, completed for our optimizers: torch's groups get
    the zeroadamw keys they lack (validated), float steps become tensors. Changes nothing of ``opt``."""
    state = dict(state)
    if "param_groups" in state:
        state["param_groups"] = completed_groups(
            state["param_groups"], opt.__dict__.get("param_groups"),
            state.get("defaults", opt.__dict__.get("defaults", {})), "loaded")
    if "state" in state:
        steps_as_tensors(state["state"])
    return state


class ConsolidationMixin:
    # ------------------------------------------------------------------------------------------ state_dict
    def state_dict(self) -> dict[str, Any]:
        """The consolidated state, in ``torch.optim.AdamW``'s format. A collective: call it on every rank.

        ``state`` maps the param index (counted over ``param_groups`` as torch does, frozen params included) to
        ``step``, ``exp_avg``, ``exp_avg_sq`` (full shape) and, for bf16/fp16 params, ``master`` (fp32 weights).
        ``torch.optim.AdamW(...).load_state_dict(sd)`` accepts it. (``rule="adalomo"``: ``exp_avg_sq_row`` /
        ``exp_avg_sq_col`` for matrices, ``exp_avg_sq`` for vectors; ``rule="lomo"``: ``step`` and ``master``;
        SparseAdamW's row-sharded params: ``step`` per row and ``decay_mark`` per row.)
        Every rank receives the full state, so this costs the full unsharded state in memory; for large models
        use :mod:`zeroadamw.checkpoint`.

        The hooks of ``register_state_dict_pre_hook`` / ``register_state_dict_post_hook`` run as in
        ``torch.optim.Optimizer.state_dict``: pre-hooks first, post-hooks on the result (a post-hook's return value,
        when not None, replaces it).
        """
        if self._check_plain():
            return torch.optim.Optimizer.state_dict(self)  # (runs the hooks itself)
        self.wait_params()  # masters of fp32 params are the params: read them updated
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
        state_dict = self._consolidated_state_dict()
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            hook_result = post_hook(self, state_dict)
            if hook_result is not None:
                state_dict = hook_result
        return state_dict

    def _index(self) -> list[Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def _consolidated_state_dict(self) -> dict[str, Any]:
        """:meth:`state_dict` without its hooks."""
        self._relocate_if_needed()
        index = {p: k for k, p in enumerate(self._index())}
        state: dict[int, dict[str, Tensor]] = {}
        if self._state_ready:
            for bucket in self.engine.buckets:
                for p, entry in self._consolidated_bucket(bucket):
                    if float(entry["step"].max()) != 0:  # never updated: no state, as in torch
                        state[index[p]] = entry
        groups = []
        for group in self.param_groups:
            g = {k: v for k, v in group.items() if k not in ("params", "process_group")}
            g["params"] = [index[p] for p in group["params"]]
            groups.append(g)
        return {"state": state, "param_groups": groups}

    def _consolidated_bucket(self, bucket: Bucket) -> list[tuple[Tensor, dict[str, Tensor]]]:
        """Whole-parameter state of every param of ``bucket`` (sharded kinds all-gathered: a collective)."""
        kinds: dict[tuple[str, str], torch.dtype] = {}
        for p in bucket.params:
            for k, (how, t) in self._state_kinds(p).items():
                if how in ("range", "rows", "blocks"):
                    kinds.setdefault((k, how), t.dtype)
        gathered = {k: self._gather_kind(bucket, k, how, dtype) for (k, how), dtype in kinds.items()}
        out = []
        for i, p in enumerate(bucket.params):
            s = bucket.layout.slots[i]
            entry = {}
            for k, (how, t) in self._state_kinds(p).items():
                if how == "range":
                    entry[k] = gathered[k][s.offset : s.offset + s.numel].view_as(p).clone()
                elif how == "rows":
                    entry[k] = gathered[k][: p.shape[0]].clone()
                elif how == "blocks":  # int8 scales: params start on block boundaries
                    b0 = s.offset // quant.BLOCK
                    entry[k] = gathered[k][b0 : b0 + quant.nblocks(s.numel)].clone()
                else:
                    entry[k] = t.detach().clone()
            out.append((p, entry))
        return out

    def _gather_kind(self, bucket: Bucket, k: str, how: str, dtype: torch.dtype) -> Tensor:
        """All-gather one sharded state kind of a bucket into its padded flat layout (rows: padded row layout)."""
        if how == "blocks":  # the bucket's flat scales: shard / 256 per rank
            flat = getattr(bucket, k)
            out = torch.empty(flat.numel() * bucket.comm.world_size, dtype=flat.dtype, device=flat.device)
            bucket.comm.all_gather(out, flat, async_op=False)
            return out
        if how == "range":
            flat = getattr(bucket, k, None) if k in Bucket.STATE_NAMES else None
            if flat is None:  # per-param ranges (AdaLomo's vector moments): pack into a flat shard first
                flat = torch.zeros(bucket.layout.shard, dtype=dtype, device=bucket.device)
                for i, p in enumerate(bucket.params):
                    if k in self.state[p]:
                        bucket.shard_view(flat, i).copy_(self.state[p][k])
            out = torch.empty(bucket.layout.padded, dtype=flat.dtype, device=flat.device)
            bucket.comm.all_gather(out, flat, async_op=False)
            return out
        # rows: one param per row-sharded bucket; every rank sends its padded share of rows
        p = bucket.params[0]
        per = bucket.layout.shard // (p.numel() // p.shape[0])
        local = torch.zeros(per, dtype=dtype, device=bucket.device)
        t = self.state[p][k]
        local[: t.numel()].copy_(t)
        out = torch.empty(per * bucket.comm.world_size, dtype=dtype, device=bucket.device)
        bucket.comm.all_gather(out, local, async_op=False)
        return out

    # ------------------------------------------------------------------------------------- load_state_dict
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a ``torch.optim.AdamW``-format state (ours or torch's) on every rank, at any world size.

        Each rank keeps only the shard it owns. Everything is validated before anything is changed. Keys torch's
        groups lack (``decay``, ``initial_lr``, the weight-decay schedule's) keep this optimizer's current values;
        a float ``step`` (old torch state dicts) is accepted.

        The hooks of ``register_load_state_dict_pre_hook`` / ``register_load_state_dict_post_hook`` run as in
        ``torch.optim.Optimizer.load_state_dict``: pre-hooks get a shallow copy of ``state_dict`` and may edit it or
        return a replacement (used from then on); post-hooks run after loading.
        """
        if not isinstance(state_dict, dict):
            raise ValueError("expected a torch.optim state dict with 'state' and 'param_groups' keys")
        if self._check_plain():  # torch's load (hooks; then our __setstate__), in our storage of the state
            return self._plain_load_state_dict(state_dict)
        self.wait_params()  # a loaded master is rounded into the params: no gather may land after it
        state_dict = state_dict.copy()  # shallow, as torch: what pre-hooks edit at the top level stays theirs
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            hook_result = pre_hook(self, state_dict)
            if hook_result is not None:
                state_dict = hook_result
        self._load_consolidated(state_dict)
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def _load_consolidated(self, state_dict: dict[str, Any]) -> None:
        """:meth:`load_state_dict` without its hooks: validate everything, then change things."""
        if not isinstance(state_dict, dict) or "state" not in state_dict or "param_groups" not in state_dict:
            raise ValueError("expected a torch.optim state dict with 'state' and 'param_groups' keys")
        self._relocate_if_needed()
        new_groups = self._loaded_groups(state_dict["param_groups"])
        if not state_dict["state"] and not self._state_ready:
            # nothing was stepped when saved: hyperparameters only, the state stays unmade (as torch's does) --
            # Accelerate's prepare() round-trips a fresh optimizer's state dict before swapping in FSDP2's
            # shards, and state made here would be keyed by the params it replaces
            for g, ng in zip(self.param_groups, new_groups):
                g.update({k: v for k, v in ng.items() if k != "params"})
            return
        self._init_state()  # allocating state changes nothing observable; validation below reads its shapes
        saved_ids = [i for sg in state_dict["param_groups"] for i in sg["params"]]
        entries = self._loaded_entries(state_dict["state"], dict(zip(saved_ids, self._index())))
        # validated: now change things
        for g, ng in zip(self.param_groups, new_groups):
            g.update({k: v for k, v in ng.items() if k != "params"})
        loaded = {p for p, _ in entries}
        for bucket in self.engine.buckets:
            for p in bucket.params:
                if p not in loaded:  # trainable but never stepped when saved: fresh state, as in torch
                    self._reset_param_state(p)
        for p, st in entries:
            self._copy_loaded(p, st)
        if entries:  # real (stepped) state was loaded: a resumed optimizer, not a fresh one
            self._state_loaded = True

    def _loaded_groups(self, saved_groups: list[dict]) -> list[dict]:
        """The loaded param groups merged over ours, validated (group count and sizes, hyperparameters)."""
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(
                f"loaded state dict has {len(saved_groups)} parameter groups, the optimizer has {len(self.param_groups)}"
            )
        for gi, (g, sg) in enumerate(zip(self.param_groups, saved_groups)):  # the shape of the groups first
            if len(g["params"]) != len(sg["params"]):
                raise ValueError(
                    f"param group {gi}: the loaded state dict has {len(sg['params'])} params, the optimizer has "
                    f"{len(g['params'])}; build the optimizer over the same param groups that were saved"
                )
        new_groups = []
        for gi, (g, sg) in enumerate(zip(self.param_groups, saved_groups)):
            ng = dict(g)
            ng.update({k: copy.deepcopy(v) for k, v in sg.items() if k not in ("params", "param_names")})
            if isinstance(ng.get("betas"), list):
                ng["betas"] = tuple(ng["betas"])
            ng.setdefault("decay", g["decay"])
            validate_hyper(ng, f" (loaded param group {gi})")
            new_groups.append(ng)
        return new_groups

    def _loaded_entries(self, saved_state: dict, id_to_param: dict) -> list[tuple[Tensor, dict[str, Any]]]:
        """The loaded per-param entries of params that have state here, each checked against this rule's kinds
        and shapes."""
        entries = []
        for key, st in saved_state.items():
            k = int(key)
            if k not in id_to_param:
                raise ValueError(f"loaded state has an entry for param index {k}, which no param group lists")
            p = id_to_param[k]
            if p not in self.engine.where:
                continue  # frozen (or empty) now: it has no optimizer state here
            if "step" not in st:
                raise ValueError(f"param index {k}: loaded state has no 'step'")
            # another storage of the moments / weights (fp32 <-> int8 codes, master <-> Kahan): convert whole
            st = storage.convert_entry(p, st, {kind: t for kind, (_, t) in self._state_kinds(p).items()},
                                       f"param index {k}")
            for kind, (how, mine) in self._state_kinds(p).items():
                if kind not in st:
                    if kind == "master":
                        continue
                    raise ValueError(
                        f"param index {k}: loaded state lacks {kind!r} -- it was written by another update rule "
                        f"than this optimizer's rule={self.rule!r} (or another optimizer class)")
                t = st[kind]
                if kind == "step" and how == "scalar" and not isinstance(t, Tensor):
                    if isinstance(t, bool) or not isinstance(t, (int, float)):
                        raise ValueError(f"param index {k}: loaded step is {t!r}; expected a number or a 0-d tensor")
                    continue  # a float step (old torch state dicts)
                want = torch.Size(self._state_shape(p, how, mine))
                if not isinstance(t, Tensor) or t.shape != want:
                    raise ValueError(
                        f"param index {k}: loaded {kind} has shape {tuple(getattr(t, 'shape', ()))}, expected "
                        f"{tuple(want)}; the state dict belongs to a different model"
                    )
            entries.append((p, st))
        return entries

    def _copy_loaded(self, p: Tensor, st: dict[str, Any]) -> None:
        """Keep this rank's part of a validated loaded entry of ``p``."""
        bucket, i = self.engine.where[p]
        s = bucket.layout.slots[i]
        for kind, (how, t) in self._state_kinds(p).items():
            if kind == "master" and "master" not in st:
                self._master_loaded(p, False)
                continue
            src = st[kind]
            if how == "range":
                t.copy_(src.reshape(-1)[s.own_lo : s.own_hi])
            elif how == "rows":
                lo, hi = self._rows_range(bucket, i)
                t.copy_(src[lo:hi])
            elif how == "blocks":
                b0 = s.own_lo // quant.BLOCK
                t.copy_(src[b0 : b0 + t.numel()])
            elif how == "scalar":
                t.fill_(float(src.item() if isinstance(src, Tensor) else src))
            else:
                t.copy_(src)
            if kind == "master":
                self._master_loaded(p, True)

    # ------------------------------------------------------------------------------ copy.deepcopy / pickle
    _COPIED_ATTRS = ("grad_norm", "group_grad_norms", "last_step_skipped", "skipped_steps", "skipped_buckets",
                     "last_step_hparams", "_resume_checked", "_state_loaded")

    def _copy_kwargs(self) -> dict[str, Any]:
        """The constructor arguments a copy is rebuilt with (deepcopy / pickle). A subclass with another
        constructor overrides this to support copies."""
        d = self.defaults
        kw = dict(lr=d["lr"], betas=d["betas"], eps=d["eps"], weight_decay=d["weight_decay"], decay=d["decay"],
                  stage=self.stage, bucket_size=self.bucket_size, master_dtype=self.master_dtype,
                  max_grad_norm=self.max_grad_norm, grads_reduced=self.engine.grads_reduced,
                  reduce_dtype=self.reduce_dtype, impl=self.impl, step_in_backward=self.step_in_backward,
                  rule=self.rule, wd_schedule=portable_wd_fn(self._wd_default[0]),
                  wd_schedule_steps=self._wd_default[1], param_views=self.param_views,
                  overlap_param_gather=self.engine.gathers.on, state_dtype=self.state_dtype,
                  kahan_sum=self.kahan_sum)
        kw.update({k: d[k] for k in self._rule.hyper_keys})
        return kw

    def _holds_gradients(self) -> bool:
        """Between backward and step(): gradients (or a half-finished backward round) live inside the engine."""
        engine = self.engine
        return bool(engine._round_active or any(any(b.present) or b.reduced_grads() for b in engine.buckets))

    _copy_base = None  # the class whose constructor _copy_kwargs describes (ShardedAdamW sets itself)

    def _check_copyable(self) -> None:
        what = f"copy.deepcopy / pickle of a {type(self).__name__}"
        base = self._copy_base
        if type(self).__init__ is not base.__init__ and type(self)._copy_kwargs is base._copy_kwargs:
            raise TypeError(f"{what} is not supported (its constructor is not ShardedAdamW's); build a new optimizer "
                            "over the copied model and opt2.load_state_dict(opt.state_dict()) instead")
        if self.comm.dp_size > 1:
            raise TypeError(
                f"{what} sharded over a process group (world size {self.comm.world_size}) is not supported: each rank "
                "holds only its shard of the state, and the copy would need the process group; build a new optimizer "
                "on every rank and opt2.load_state_dict(opt.state_dict()) (or use zeroadamw.checkpoint) instead")
        if self.comm.group is not None:
            raise TypeError(f"{what} built with an explicit process_group is not supported (a process group cannot "
                            "be copied); build a new optimizer and opt2.load_state_dict(opt.state_dict()) instead")
        if self._check_plain():
            raise TypeError(f"{what} acting as another system's client optimizer (DeepSpeed replaced its "
                            "param_groups) is not supported; copy that system's optimizer, or use state_dict()")
        if self._holds_gradients():
            raise TypeError(f"{what} between backward and step() is not supported: it holds this step's gradients "
                            "inside (step_in_backward / stage 2); copy it after step() or zero_grad(), or use "
                            "state_dict()")

    def __getstate__(self) -> dict[str, Any]:
        """For ``copy.deepcopy`` and ``pickle``: the constructor arguments, the param groups (their tensors are
        copied with the optimizer, as torch's are) and the consolidated state. The copy rebuilds its own engine,
        buckets and gradient hooks over its params (:meth:`__setstate__`)."""
        self._check_copyable()
        groups = []
        for group, fn in zip(self.param_groups, self._wd_fns):
            g = {k: v for k, v in group.items() if k != "process_group"}
            g["wd_schedule"], g["wd_schedule_steps"] = portable_wd_fn(fn), None
            groups.append(g)
        return {"_zeroadamw_rebuild": 1, "kwargs": self._copy_kwargs(), "param_groups": groups,
                "state_dict": self._consolidated_state_dict(), "grad_norm_tensor": self.grad_norm_tensor,
                "attrs": {k: self.__dict__[k] for k in self._COPIED_ATTRS if k in self.__dict__}}

    def __setstate__(self, state: dict[str, Any]) -> None:
        if not state.get("_zeroadamw_rebuild"):
            # torch.optim.Optimizer.load_state_dict installing a loaded state (plain mode): complete torch's groups
            return super().__setstate__(complete_loaded_state(self, state))
        # a copy: a fresh optimizer (engine, buckets, hooks) over the copied params, then the state
        type(self).__init__(self, state["param_groups"], **state["kwargs"])
        self._load_consolidated(state["state_dict"])
        self.grad_norm_tensor.copy_(state["grad_norm_tensor"])
        self.__dict__.update(state["attrs"])
