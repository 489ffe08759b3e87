r"""SparseAdamW: lazy, exact AdamW for MoE experts and embedding rows, sharded over (expert) data-parallel groups.

In a Mixture-of-Experts step many experts get no tokens. In Hugging Face's Mixtral / Qwen-MoE the experts are
3-D tensors ``[E, out, in]`` and an idle expert receives an all-zero gradient slice, so a dense AdamW still moves
it by its stale momentum and still decays it ("ghost updates"). SparseAdamW treats the slices along dim 0 of the
params in ``{"sparse": "rows"}`` groups (experts; embedding rows) as independent:

* a slice is **touched** this step if any rank gave it a non-zero gradient entry -- an explicit per-row mask,
  OR-reduced over the group's ranks (never "the reduced sum is non-zero": ``[1, -1]`` on two ranks is touched);
* **untouched** slices keep their moments, their step count and their weights;
* **touched** slices take an AdamW step with their **own step count** :math:`t_r` for bias correction:

.. math::
   m_r \leftarrow \beta_1 m_r + (1-\beta_1) g_r,\quad v_r \leftarrow \beta_2 v_r + (1-\beta_2) g_r^2,\quad
   \theta_r \leftarrow \theta_r\,(1-\gamma\lambda) - \frac{\gamma}{1-\beta_1^{t_r}}\,
   \frac{m_r}{\sqrt{v_r}/\sqrt{1-\beta_2^{t_r}}+\epsilon}

* ``catchup_decay=True`` (default): when a slice comes back after idle steps it first receives exactly the
  decoupled decay it missed. Each group keeps the cumulative log-decay :math:`L_t = \sum_{s\le t}
  \log(1-\gamma_s\lambda)` and each slice the value of :math:`L` at its last update (``decay_mark``); the catch-up
  factor is :math:`e^{L_{t-1}-\text{mark}_r}`. Weights then follow dense decoupled decay exactly, while moments
  stay lazy. (``decay="independent"``: the same with :math:`\lambda\gamma_s/\gamma_{max}`. ``decay="l2"`` puts
  the decay into the gradient, which an idle slice does not have: no catch-up, lazy only.) Idle slices lag behind
  until they are touched; :meth:`SparseAdamW.apply_pending_decay` brings every slice up to date (before an
  evaluation or export, say). ``catchup_decay=False``: idle slices are not decayed at all.

Gradients of ``"rows"`` params may be dense (experts; zero slices for idle experts) or torch sparse COO
(``nn.Embedding(sparse=True)``). COO gradients are coalesced and exchanged across the group as indices + values
(all-gather, padded to the largest count); no dense gradient is materialised. Whether a param's gradient is dense
or COO is agreed across its group at the first backward (one small all-reduce per row-sharded param per backward,
which also carries the touched mask).

Row-sharded params are sharded by whole rows: each rank owns a contiguous block of ``ceil(E / N)`` slices.

**Expert groups.** A param group with ``"process_group": group`` is reduced, sharded and agreed over that group
only (expert data parallelism: the ranks holding the same experts); dense params over the optimizer's
``process_group``. The global gradient norm (clipping, ``grad_norm``) sums every rank's owned shard over all
ranks, so every element -- expert or not -- counts exactly once. **Never a hang:** every rank issues the same
collectives in the same order whatever its routing; a rank whose experts got no tokens (or whose gradient is
``None``) still takes part, contributing zeros (the mean is over all ranks of the group, as with DDP).
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import torch
import torch.distributed as dist
from torch import Tensor

from . import functional as F
from . import quant, storage
from .comm import Comm
from .buckets import Bucket, DirectBucket, check_grad, dense_buckets, master_dtype_for, trainable
from .options import lr_max
from .sharded_adamw import ShardedAdamW

__all__ = ["SparseAdamW", "RowBucket", "moe_param_groups"]

_DENSE, _COO = 1.0, 2.0


def _nonzero_rows(g: Tensor) -> Tensor:
    """Rows of a 2-D tensor with any non-zero entry (max > 0 or min < 0: two reductions, no temporary)."""
    if g.numel() == 0:
        return torch.zeros(g.shape[0], dtype=torch.bool, device=g.device)
    return (g.amax(dim=1) > 0) | (g.amin(dim=1) < 0)


class RowBucket(Bucket):
    """One ``{"sparse": "rows"}`` parameter, sharded by whole rows (slices along dim 0)."""

    always_hooked = True

    def __init__(self, param: Tensor, group_index: int, comm: Comm, reduce_dtype, acc_dtype, master_dtype,
                 moments=None, kahan: bool = False) -> None:
        if param.ndim < 1 or param.numel() == 0:
            raise ValueError("sparse='rows' needs parameters with at least one dimension (rows along dim 0)")
        rows, width = param.shape[0], param.numel() // param.shape[0]
        super().__init__([param], group_index, comm, reduce_dtype, acc_dtype, master_dtype, unit=width,
                         moments=moments, kahan=kahan)
        self.R, self.D = rows, width
        s = self.layout.slots[0]
        self.rows_lo, self.rows_hi = s.own_lo // self.D, s.own_hi // self.D
        self.kind: float | None = None  # _DENSE or _COO, agreed across the group at the first backward
        self.local_kind = 0.0
        self.local_touched = torch.zeros(self.R, dtype=torch.bool, device=self.device)
        self.touched = torch.zeros(self.R, dtype=torch.bool, device=self.device)  # global, since the last step
        self.coo_in: list[tuple[Tensor, Tensor]] = []  # COO gradients landed this round (local)
        self.coo_rows: list[Tensor] = []  # reduced COO: owned rows (local row index) and values, per round
        self.coo_vals: list[Tensor] = []

    # ------------------------------------------------------------------------------------------------ landing
    def check(self, p: Tensor, grad: Tensor) -> tuple[type, str] | None:
        if grad.is_sparse:
            if grad.shape != p.shape:
                return ValueError, f"gradient shape {tuple(grad.shape)} does not match its parameter's {tuple(p.shape)}"
            if grad.dtype != p.dtype:
                return ValueError, f"gradient dtype {grad.dtype} does not match its parameter's dtype {p.dtype}"
            if grad.sparse_dim() != 1:
                return ValueError, "sparse COO gradients must be sparse along dim 0 only (rows), as nn.Embedding's are"
            return None
        return check_grad(p, grad)

    def land(self, i: int, grad: Tensor) -> None:
        if grad.is_sparse:
            g = grad.coalesce()
            idx = g.indices()[0]
            vals = g.values().reshape(idx.numel(), self.D)
            nz = _nonzero_rows(vals)
            self.local_touched[idx[nz]] = True
            self.coo_in.append((idx, vals))
            self.local_kind = max(self.local_kind, _COO)
            self._mark_landed(i)
            return
        self.local_touched |= _nonzero_rows(grad.reshape(self.R, self.D))
        self.local_kind = max(self.local_kind, _DENSE)
        super().land(i, grad)

    def fill_missing(self) -> None:
        if self.kind == _COO or (self.kind is None and self.local_kind == _COO):
            return
        super().fill_missing()

    # ----------------------------------------------------------------------------------------------- reducing
    def launch(self) -> None:
        # one small all-reduce: [gradient kind, touched mask per row] -- agrees on dense vs COO and on the mask.
        # The kind is read on the host only until it is known (the first backward that had a gradient anywhere);
        # after that each rank checks its own kind on the host and the mask stays on the device.
        kind_t = torch.full((1,), self.local_kind, dtype=torch.float32, device=self.device)
        msg = torch.cat([kind_t, self.local_touched.to(torch.float32)])
        world = self.comm.world  # every rank that contributes gradients (a mesh: all rows)
        if world.world_size > 1:  # through the control plane: on the group's control device, and back
            self.tracker.control.all_reduce_packed(msg, comm=world, op=dist.ReduceOp.MAX)
        if self.kind is None:
            kind = float(msg[0]) if world.world_size > 1 else self.local_kind
            if kind > 0:
                self.kind = kind
        if self.local_kind > 0 and self.kind is not None and self.local_kind != self.kind and self.tracker is not None:
            self.tracker.error(RuntimeError, "a parameter's gradient switched between dense and sparse COO across "
                               "backward passes; give it the same kind of gradient every step")
        self.touched |= msg[1:] > 0
        self.local_touched.zero_()
        if self.kind == _COO:
            full, self.full = self.full, None
            self._give(full)
            self._exchange_coo()
            self.launched = True
            return
        self._ensure_full()
        super().launch()

    def _ensure_full(self) -> None:
        """A dense round needs the full buffer even when no gradient landed here (zeros)."""
        if self.full is None:
            self.full = self._alloc_full(zero=True)

    def _dense_reduced(self) -> Tensor | None:
        """The reduced dense gradient of the owned rows, flat (or None)."""
        return self.shard_grad

    def finish(self) -> None:
        if self.kind == _COO:
            return
        super().finish()

    def _exchange_coo(self) -> None:
        """Sum the ranks' COO gradients (averaged over the group) and keep the rows this rank owns."""
        if self.coo_in:
            idx = torch.cat([i for i, _ in self.coo_in])
            vals = torch.cat([v for _, v in self.coo_in]).to(self.acc_dtype)
        else:
            idx = torch.zeros(0, dtype=torch.long, device=self.device)
            vals = torch.zeros(0, self.D, dtype=self.acc_dtype, device=self.device)
        self.coo_in = []
        world = self.comm.world  # COO rows come from every rank (a mesh: all rows), each keeps what it owns
        n = world.world_size
        if n > 1:  # variable-size exchange: the counts are read on the host (COO gradients only)
            dev = self._control_device(world)
            counts = torch.full((1,), idx.numel(), dtype=torch.int64, device=dev)
            all_counts = torch.empty(n, dtype=counts.dtype, device=counts.device)
            world.all_gather(all_counts, counts, async_op=False)
            m = int(all_counts.max())  # host read (COO only)
            pad_idx = torch.full((m,), -1, dtype=torch.long, device=self.device)
            pad_idx[: idx.numel()] = idx
            pad_vals = torch.zeros(m, self.D, dtype=self.acc_dtype, device=self.device)
            pad_vals[: idx.numel()] = vals
            g_idx = torch.empty(n * m, dtype=torch.long, device=self.device)
            g_vals = torch.empty(n * m * self.D, dtype=self.acc_dtype, device=self.device)
            world.all_gather(g_idx, pad_idx, async_op=False)
            world.all_gather(g_vals, pad_vals.reshape(-1), async_op=False)
            keep = g_idx >= 0
            idx, vals = g_idx[keep], g_vals.view(n * m, self.D)[keep]
        own = (idx >= self.rows_lo) & (idx < self.rows_hi)
        idx, vals = idx[own] - self.rows_lo, vals[own]
        if idx.numel():
            summed = torch.sparse_coo_tensor(idx.unsqueeze(0), vals, (self.rows_hi - self.rows_lo, self.D),
                                             check_invariants=False).coalesce()
            idx, vals = summed.indices()[0], summed.values().div_(n)
        self.coo_rows.append(idx)
        self.coo_vals.append(vals)
        if self.tracker is not None:
            self.tracker._count_shard(vals.numel() * vals.element_size())

    def _control_device(self, comm=None) -> torch.device:
        ctl = getattr(self.tracker, "control", None)
        return ctl.device_for(comm or self.comm) if ctl is not None else self.device

    def owned_rows_dense(self) -> Tensor:
        """The averaged gradient of the owned rows as a ``[rows, D]`` tensor (a view of the reduced shard for
        dense gradients; COO gradients scattered into zeros)."""
        rows = self.rows_hi - self.rows_lo
        if self.kind == _COO:
            out = torch.zeros(rows, self.D, dtype=self.acc_dtype, device=self.device)
            for r, v in zip(self.coo_rows, self.coo_vals):
                out.index_add_(0, r, v)
            return out
        g = self._dense_reduced()
        if g is None:
            return torch.zeros(rows, self.D, dtype=self.acc_dtype, device=self.device)
        return g[: rows * self.D].view(rows, self.D)

    def reduced_grads(self) -> list[Tensor]:
        if self.kind == _COO:
            return list(self.coo_vals)
        g = self._dense_reduced()
        return [] if g is None else [g[: (self.rows_hi - self.rows_lo) * self.D]]

    def release_grads(self) -> None:
        freed = sum(v.numel() * v.element_size() for v in self.coo_vals)
        if self.tracker is not None and freed:
            self.tracker._count_shard(-freed)
        self.coo_rows, self.coo_vals, self.coo_in = [], [], []
        super().release_grads()

    def clear_grads(self) -> None:
        super().clear_grads()
        self.touched.zero_()
        self.local_touched.zero_()
        self.local_kind = 0.0

    def to_device(self, device: torch.device) -> None:
        super().to_device(device)
        self.local_touched = self.local_touched.to(device)
        self.touched = self.touched.to(device)


class DirectRowBucket(RowBucket, DirectBucket):
    """A row-sharded param in one process: its dense gradients are kept as autograd made them (DirectBucket)."""

    def _ensure_full(self) -> None:
        pass  # no buffer: nothing to reduce

    def _dense_reduced(self) -> Tensor | None:
        return self.direct_grads[0]


class SparseAdamW(ShardedAdamW):
    r"""ShardedAdamW with lazy, exact updates for ``{"sparse": "rows"}`` groups (see the module docstring).

    Same constructor as :class:`~zeroadamw.ShardedAdamW` (stage, process_group, decay modes, clipping,
    accumulation, state_dict semantics) plus ``catchup_decay``; per-group keys ``"sparse": "rows"`` and
    ``"process_group": <group>``. ``step_in_backward`` is not supported (use ShardedAdamW for it).
    """

    _stepped_this_call = False  # some bucket took the update in this step() call (the log-decay advances)

    def __init__(self, params: Iterable, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, *, catchup_decay: bool = True, **kwargs: Any) -> None:
        if kwargs.get("step_in_backward"):
            raise ValueError("SparseAdamW does not support step_in_backward; use ShardedAdamW(step_in_backward=True)")
        if kwargs.get("rule", "adamw") != "adamw":
            raise ValueError("SparseAdamW implements the AdamW rule only")
        self.catchup_decay = bool(catchup_decay)
        self._comms: dict[Any, Comm] = {}
        super().__init__(params, lr, betas, eps, weight_decay, **kwargs)

    # ------------------------------------------------------------------------------------------------ groups
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        sparse = param_group.get("sparse")
        if sparse not in (None, "rows"):
            raise ValueError(f"param group option sparse={sparse!r}: expected 'rows' or None")
        pg = param_group.get("process_group")
        if pg is not None:
            if not (dist.is_available() and dist.is_initialized()):
                raise ValueError("a param group has a process_group but torch.distributed is not initialised")
            if dist.get_rank(pg) < 0:
                raise ValueError(
                    "a param group's process_group does not contain this rank: every rank must pass, for each "
                    "group, the process group it belongs to (e.g. its expert-data-parallel group)")
        if sparse == "rows":
            for p in param_group["params"] if not isinstance(param_group["params"], Tensor) else [param_group["params"]]:
                if isinstance(p, Tensor) and p.ndim == 0:
                    raise ValueError("sparse='rows' on a 0-d parameter: it has no rows; put it in a dense group")
        param_group.setdefault("sparse", None)
        param_group.setdefault("process_group", None)
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        group.setdefault("log_decay", 0.0)  # cumulative log-decay L_t of the group (catch-up decay)

    def _group_comm(self, group: dict) -> Comm:
        pg = group.get("process_group")
        if pg is None:
            return self.comm
        if pg not in self._comms:
            self._comms[pg] = Comm(pg)
        return self._comms[pg]

    def _make_buckets(self, gi: int) -> tuple[list[Bucket], list]:
        """Row-sharded groups: one :class:`RowBucket` per param; dense groups over their own process group (expert
        groups) or the optimizer's."""
        group = self.param_groups[gi]
        comm = self._group_comm(group)
        if group.get("sparse") != "rows":
            buckets, entries = dense_buckets(group["params"], gi, comm, self.bucket_size, self.master_dtype,
                                             self.reduce_dtype, in_backward=self.step_in_backward,
                                             state_dtype=self.state_dtype, kahan=self.kahan_sum)
            head = [gi, len(group["params"])] + ([] if comm is self.comm else [None])
            return buckets, head + entries
        buckets, entries = [], []
        for p in trainable(group["params"]):
            master = master_dtype_for(p.dtype, self.master_dtype)
            cls = DirectRowBucket if comm.dp_size == 1 else RowBucket  # rows always reduce in backward
            sd = self.state_dtype
            if sd == "int8" and (p.numel() < quant.MIN_QUANTIZED_NUMEL or (p.numel() // p.shape[0]) % quant.BLOCK):
                sd = "fp32"  # int8 blocks must lie inside rows (rows of a multiple of 256 elements), else fp32
            kahan = self.kahan_sum and master is None
            moments = storage.moment_dtype(sd, p.dtype, master, kahan)
            buckets.append(cls(p, gi, comm, self.reduce_dtype or p.dtype, storage.acc_dtype(p.dtype, master, kahan),
                               master, moments=moments, kahan=self.kahan_sum))
            entries.append(("rows", str(p.dtype), str(moments), list(p.shape)))
        return buckets, [gi, len(group["params"]), "rows"] + entries

    # ------------------------------------------------------------------------------------------------- state
    def _init_bucket_state(self, bucket: Bucket) -> None:
        super()._init_bucket_state(bucket)
        if isinstance(bucket, RowBucket):
            p = bucket.params[0]
            rows = bucket.rows_hi - bucket.rows_lo
            st = self.state[p]
            st["step"] = torch.zeros(rows, dtype=torch.float32, device=bucket.device)
            st["decay_mark"] = torch.zeros(rows, dtype=torch.float64, device=bucket.device)

    def _state_kinds(self, p: Tensor) -> dict[str, tuple[str, Tensor]]:
        out = super()._state_kinds(p)
        bucket = self.engine.where.get(p, (None,))[0]
        if isinstance(bucket, RowBucket):
            out["step"] = ("rows", self.state[p]["step"])
            out["decay_mark"] = ("rows", self.state[p]["decay_mark"])
        return out

    # ------------------------------------------------------------------------------------------------- step
    def _before_step(self) -> None:
        """Remember L_{t-1} and this step's log-decay factor per group (the lr / weight decay of this step)."""
        for g in self.param_groups:  # (a group loaded from another optimizer's checkpoint has none yet)
            g.setdefault("log_decay", 0.0)
        self._log_decay_before = {id(g): g["log_decay"] for g in self.param_groups}
        self._factors = {id(g): self._log_factor(g) for g in self.param_groups}

    def _after_step(self) -> None:
        if not self.last_step_skipped and self._stepped_this_call:
            for g in self.param_groups:  # L_t += log(1 - lr_t * w): once per taken step, touched rows or not
                g["log_decay"] = self._log_decay_before[id(g)] + self._factors[id(g)]
        self._stepped_this_call = False

    def _log_factor(self, group: dict) -> float:
        if group["decay"] == "l2" or not group["weight_decay"]:
            return 0.0
        w = F.effective_weight_decay(group["decay"], group["weight_decay"], lr_max(group))
        f = 1.0 - float(group["lr"]) * w
        if f <= 0:
            raise ValueError(f"lr * weight_decay = {1 - f} >= 1: the decay would flip the weights' sign")
        return math.log(f)

    def _update_bucket(self, bucket: Bucket, present: list[bool], grad_scale: Tensor | None) -> None:
        self._stepped_this_call = True
        if not isinstance(bucket, RowBucket):
            return super()._update_bucket(bucket, present, grad_scale)
        self._update_rows(bucket, grad_scale)

    def _update_rows(self, bucket: "RowBucket", grad_scale: Tensor | None) -> None:
        """The lazy AdamW step of a row-sharded param's owned rows (:func:`zeroadamw.functional.lazy_adamw_rows`,
        the touched mask on the device: no host read, no Python loop over rows)."""
        rows = bucket.rows_hi - bucket.rows_lo
        if rows == 0:
            return
        group = self.param_groups[bucket.group_index]
        st = self.state[bucket.params[0]]
        self._refresh_master(bucket, [0])
        D = bucket.D
        w = storage.working(bucket, [0], True)  # fp32 working copies of low-precision storage (storage.py)
        theta = w.targets[0].view(rows, D)
        g = bucket.owned_rows_dense().to(theta.dtype)
        if grad_scale is not None:
            g = g / grad_scale.to(theta.dtype)
        beta1, beta2 = group["betas"]
        mask = bucket.touched[bucket.rows_lo : bucket.rows_hi]
        F.lazy_adamw_rows(
            theta, g, w.exp_avgs[0].view(rows, D), w.exp_avg_sqs[0].view(rows, D),
            st["step"], st["decay_mark"], mask,
            lr=float(group["lr"]), beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"],
            decay=group["decay"], lr_max=lr_max(group), log_decay_before=self._log_decay_before.get(id(group), group["log_decay"]),
            log_factor=self._factors[id(group)], catchup=self.catchup_decay)
        storage.store(bucket, [0], w, None, rows_touched=mask, steps=[st["step"]])  # idle rows keep their codes

    def apply_pending_decay(self) -> None:
        """Give every idle slice the decoupled decay it has missed so far (catch-up now instead of at its next
        update): afterwards the weights equal dense decoupled decay. A collective (re-gathers the params)."""
        self.wait_params()  # rewrites owned rows a deferred all-gather may still be sending
        if not self.catchup_decay or not self._state_ready:
            return
        with torch.no_grad():
            for bucket in self.engine.buckets:
                if not isinstance(bucket, RowBucket):
                    continue
                group = self.param_groups[bucket.group_index]
                if group["decay"] == "l2" or not group["weight_decay"]:
                    continue
                p = bucket.params[0]
                st = self.state[p]
                L = group["log_decay"]
                w = storage.working(bucket, [0], False)  # Kahan: decay param + compensation, split back
                F.catch_up_decay(w.targets[0].view(-1, bucket.D), st["decay_mark"], L)
                storage.store(bucket, [0], w, None)
                st["decay_mark"].fill_(L)
                h = bucket.gather_params([0])
                if h is not None:
                    h.wait()


def moe_param_groups(model: torch.nn.Module, weight_decay: float = 0.0, *, embeddings_sparse: bool = True,
                     expert_process_group=None) -> tuple[list[dict], dict[str, list[str]]]:
    """SparseAdamW param groups for a Hugging Face MoE model (Mixtral, Qwen2-MoE, Qwen3-MoE style) or any model.

    * ``experts``: fused expert tensors (``...experts.gate_up_proj`` / ``...experts.down_proj``, 3-D, dim 0 =
      expert) and per-expert modules (``...experts.<i>.*``) -> ``{"sparse": "rows"}`` (3-D) and dense otherwise,
      over ``expert_process_group`` when given;
    * ``embeddings``: input embeddings (``nn.Embedding`` weights) -> ``{"sparse": "rows"}`` when
      ``embeddings_sparse`` (rows = tokens; COO gradients accepted), no weight decay (a choice of ours for
      lazily updated rows -- HF Trainer's own split does decay embeddings; pass your own groups for that);
    * ``decay`` / ``no_decay``: the rest, biases and norm weights without decay (Trainer's rule).

    Returns ``(groups, names)`` where ``names`` maps each group's name to the parameter names it holds.
    """
    embedding_params = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    named = {"experts_rows": [], "experts_dense": [], "embeddings": [], "decay": [], "no_decay": []}
    params: dict[str, list[Tensor]] = {k: [] for k in named}
    seen = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        if ".experts." in name or name.startswith("experts."):
            key = "experts_rows" if p.ndim == 3 else "experts_dense"
        elif id(p) in embedding_params:
            key = "embeddings" if embeddings_sparse else "no_decay"
        elif p.ndim < 2 or "norm" in name.lower() or name.endswith(".bias"):
            key = "no_decay"
        else:
            key = "decay"
        params[key].append(p)
        named[key].append(name)
    groups = []
    spec = {
        "experts_rows": {"sparse": "rows", "weight_decay": weight_decay, "process_group": expert_process_group},
        "experts_dense": {"weight_decay": weight_decay, "process_group": expert_process_group},
        "embeddings": {"sparse": "rows", "weight_decay": 0.0},
        "decay": {"weight_decay": weight_decay},
        "no_decay": {"weight_decay": 0.0},
    }
    names: dict[str, list[str]] = {}
    for key, opts in spec.items():
        if params[key]:
            groups.append({"params": params[key], "name": key, **opts})
            names[key] = named[key]
    return groups, names
