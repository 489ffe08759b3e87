r"""ShardedAdamW: AdamW with ZeRO stage 1/2 sharding over ``torch.distributed``; plain fast AdamW in one process.

Design (the ZeRO-2 data flow, one step, ``N`` data-parallel ranks)::

    backward ──► post-accumulate-grad hook: copy param.grad into its bucket, free param.grad
             ──► bucket full ──► reduce-scatter (async, fixed bucket order) ──► 1/N averaged shard, full buffer freed
             ──► end of backward: send buckets that did not fill (zeros for missing grads), wait for all
    step()   ──► one small all-reduce: [sum of squared shard grads, which params got a gradient anywhere]
             ──► grad_norm; skip the step on every rank if it is not finite; clipping coefficient
             ──► per bucket: fused AdamW on the owned shard (fp32 master for bf16/fp16 params)
             ──► all-gather the updated shard into every rank's params (async, pipelined with the next bucket)

Stage 1 keeps full gradients in ``param.grad`` until ``step()`` and reduce-scatters them there (or, with
``grads_reduced=True``, uses the gradients DDP already averaged and only all-gathers params). One process is the
same code path with ``N = 1``: no buffers, no collectives; the update reads ``param.grad`` directly.

Memory per rank, :math:`\Psi` trainable params, ``p`` bytes per param element, ``N`` ranks, Adam state in
fp32 (plus the fp32 master for bf16/fp16 params):

============================ ================ ============================= ==============================
                              params           gradients                     optimizer state
============================ ================ ============================= ==============================
torch AdamW + DDP             p Ψ              p Ψ                           8Ψ (+4Ψ master)
stage 1                       p Ψ              p Ψ (+ ≤ 3 buckets at step)   (8Ψ (+4Ψ)) / N
stage 2                       p Ψ              ≤ 3 buckets + 4Ψ/N shard      (8Ψ (+4Ψ)) / N
============================ ================ ============================= ==============================

Gradient accumulation: backward passes under :meth:`ShardedAdamW.no_sync` communicate nothing; gradients
accumulate in ``param.grad`` (full size, like DDP's ``no_sync``) and are reduced by the next backward outside it.
Backward passes *outside* ``no_sync`` each reduce-scatter and accumulate into the 1/N shard (k times the
communication, 1/N of the memory) -- choose per job.
"""

from __future__ import annotations

import contextlib
import math
import warnings
import weakref
from typing import Any, Callable, Iterable

import torch
from torch import Tensor

from . import functional as F
from .agree import AgreementMixin
from .amp import GradScalerMixin
from .buckets import Bucket, dense_buckets
from .mesh import make_comm
from .consolidation import ConsolidationMixin
from .control import Control
from .engine import GradEngine
from .in_backward import InBackwardMixin, engine_callbacks
from .options import (DEFAULT_BUCKET_SIZE, auto_bucket_size, check_fsdp_options, check_params, materialise_params,
                      trainable_numel,
                      validate_hyper, validate_max_grad_norm, validate_options)
from .plain import PlainModeMixin
from .rules import get_rule
from .schedules import WdSchedule, WdScheduleMixin
from .state import StateMixin

__all__ = ["ShardedAdamW", "DEFAULT_BUCKET_SIZE"]

# GradScaler passes itself as ``grad_scaler=`` to optimizers whose step() accepts it, with a FutureWarning
# about a replacement contract that cannot express a sharded optimizer's global inf check. We rely on the
# working contract; silence only that message.
warnings.filterwarnings("ignore", message="GradScaler is going to stop passing itself", category=FutureWarning)


def _weak(opt: "ShardedAdamW", method: str, gone: Any = None):
    """A callback for the engine calling ``opt.<method>(...)``, holding the optimizer weakly (the engine's gradient
    hooks must not keep the optimizer alive); ``gone`` once the optimizer is."""
    ref = weakref.ref(opt)

    def call(*args):
        o = ref()
        return gone if o is None else getattr(o, method)(*args)

    return call


class ShardedAdamW(StateMixin, AgreementMixin, InBackwardMixin, GradScalerMixin, ConsolidationMixin, PlainModeMixin,
                   WdScheduleMixin, torch.optim.Optimizer):
    r"""AdamW whose state (stage 1) and gradients (stage 2) are sharded across data-parallel ranks.

    Args:
        params: iterable of tensors or param-group dicts, as in ``torch.optim``. Per-group keys: ``lr``,
            ``betas``, ``eps``, ``weight_decay``, ``decay``. Frozen params (``requires_grad=False``) may be listed;
            they cost nothing.
        lr, betas, eps, weight_decay: as in :class:`torch.optim.AdamW`.
        decay: ``"decoupled"`` -- :math:`\theta \leftarrow \theta(1-\gamma_t\lambda)`, exactly
            ``torch.optim.AdamW``; ``"independent"`` -- :math:`\theta \leftarrow \theta(1-\lambda\gamma_t/
            \gamma_{max})` with :math:`\gamma_{max}` the group's ``initial_lr`` (set here if absent; LR schedulers
            set the same key), so the decay strength does not move when the peak lr is tuned; ``"l2"`` -- Adam
            with :math:`g \leftarrow g + \lambda\theta`. See :mod:`zeroadamw.functional`.
        stage: ``1`` shards the optimizer state; ``2`` also shards gradients, reduce-scattering them during
            backward. Both all-gather the updated params after the step.
        process_group: the data-parallel group; ``None`` = the default group, or a single process when
            ``torch.distributed`` is not initialised.
        device_mesh: instead of ``process_group``, a ``DeviceMesh``: 1-D (its group), or 2-D with
            ``mesh_dim_names=("replicate", "shard")`` -- state and gradients sharded over ``"shard"`` (inside a
            node), replicated over ``"replicate"`` (across nodes): per bucket a reduce-scatter over ``"shard"``, an
            all-reduce of the shard over ``"replicate"``, the update, an all-gather over ``"shard"``
            (:mod:`zeroadamw.mesh`; :func:`zeroadamw.mesh_from_env` builds it under torchrun).
        bucket_size: elements per communication bucket; ``None`` (default) picks about 1/32 of the trainable
            elements, between 2**20 and :data:`DEFAULT_BUCKET_SIZE` (2**23): ``options.auto_bucket_size``.
        master_dtype: dtype of the sharded master weights kept for bf16/fp16 params (default fp32); ``None``
            updates low-precision params in their own dtype (moments in that dtype too, unless ``state_dtype``).
        state_dtype: storage of ``exp_avg`` / ``exp_avg_sq``: ``"fp32"``, ``"bf16"`` (stochastic rounding) or
            ``"int8"`` (block-wise 8-bit, params of >= 4096 elements); the math runs in fp32 (but for bf16/fp16
            params without master or Kahan whose moments are in their own dtype: torch's native update).
            ``None``: the master's dtype, else the param's. int8 state dicts hold uint8 codes: load them here or
            in :class:`zeroadamw.AdamW` (``torch.optim.AdamW`` would cast the codes to floats; export with
            ``zeroadamw.checkpoint.export_consolidated`` for torch). See :mod:`zeroadamw.storage`.
        kahan_sum: with ``master_dtype=None``: keep a compensation buffer in the param dtype instead of an fp32
            master (Kahan summation: bf16 weights train like mixed precision at 2 bytes less per param).
        max_grad_norm: clip the global L2 norm of the averaged gradients to this value (over all shards);
            ``None`` = no clipping. :attr:`grad_norm` is computed every step either way.
        grads_reduced: stage 1 only. ``True`` when gradients arrive already averaged across ranks because the
            model is wrapped in ``DistributedDataParallel``; then the optimizer does not reduce them again and
            only all-gathers params. Use DDP + stage 1 when overlapping the gradient all-reduce with backward
            matters more than bandwidth (DDP's all-reduce + our all-gather = 1.5x the bytes of stage 2); use
            stage 2 without DDP for the least memory and traffic.
        reduce_dtype: dtype gradients are communicated in (default: the param dtype, as DDP does).
        impl: update kernel: ``"auto"`` (fused where supported, else foreach), ``"fused"``, ``"foreach"``,
            ``"reference"``.
        step_in_backward: update each bucket during backward, as soon as its (reduced) gradient exists, and free
            the gradient right there (LOMO's memory saving, any N). With ``max_grad_norm`` the reduced 1/N shards
            are held until backward ends and the update waits for ``step()`` (exact clipping, no second backward).
            Under ``no_sync()`` every backward still reduces, into an fp32 1/N accumulator; the backward outside
            it updates.
        rule: ``"adamw"`` (default), ``"lomo"`` (SGD, as in LOMO) or ``"adalomo"`` (factored second moment with
            grouped update normalisation, as in AdaLomo); with or without ``step_in_backward``.
        adalomo_eps, clip_threshold, decay_rate: AdaLomo's hyperparameters (the paper's defaults).
        wd_schedule: a weight-decay schedule applied per group on top of the lr schedule: ``"constant"``,
            ``"linear"``, ``"cosine"`` (over ``wd_schedule_steps`` taken steps) or a callable ``step -> multiplier``;
            ``None`` (default) = none. A group dict may set its own ``wd_schedule`` / ``wd_schedule_steps``.
            The group's ``weight_decay`` is then :math:`\lambda\,m(t)`; see :mod:`zeroadamw.schedules`.
        wd_schedule_steps: ``T`` of the named schedules.
        param_views: at N > 1, make the params views of their buckets' flat buffers, so that the all-gather
            writes them in place (no output buffer, no copy). ``p.data = t`` and ``model.to(device)`` later are
            followed (bound again); ``torch.save`` of one param then writes its whole bucket (clone it first).
        overlap_param_gather: leave the all-gather in flight after ``step()``; each module's forward waits for
            its own params (:mod:`zeroadamw.gathers`). Read params outside a forward only after
            :meth:`wait_params`. Off by default.

    After ``step()``: :attr:`grad_norm` (float, before clipping; after loss-scale unscaling),
    :attr:`group_grad_norms` (the same, per param group) and :attr:`last_step_skipped` (``True`` when a non-finite gradient anywhere skipped the step on every rank).

    Contract with the training loop: every rank runs the same number of backward passes between steps, and
    ``step()``, ``state_dict()`` and ``load_state_dict()`` are called on every rank (they are collectives).
    With stage 2, ``param.grad`` is ``None`` after backward -- gradients live, sharded, inside the optimizer;
    clip with ``max_grad_norm`` (``torch.nn.utils.clip_grad_norm_`` would see no gradients).

    Where the code is (each one hop from here): hyperparameter and option checks -- :mod:`zeroadamw.options`;
    buckets -- :mod:`zeroadamw.buckets`; gradient hooks and reduction -- :mod:`zeroadamw.engine`; small
    collectives -- :mod:`zeroadamw.control`, and what a step agrees on -- :mod:`zeroadamw.agree`; state storage
    -- :mod:`zeroadamw.state`; the update rules -- :mod:`zeroadamw.rules`; the fused step in backward --
    :mod:`zeroadamw.in_backward`; GradScaler -- :mod:`zeroadamw.amp`; ``state_dict`` and copies --
    :mod:`zeroadamw.consolidation`; DeepSpeed's client mode -- :mod:`zeroadamw.plain`; weight-decay schedules
    (``_wd_take``, ``_record_step_hparams``, ``_advance_wd_schedule``) -- :mod:`zeroadamw.schedules`. The
    ``*Mixin`` classes are sections of this class, one file each (``_local_checks`` / ``_agree_step`` in agree,
    ``_init_state`` / ``_relocate_if_needed`` in state, ``_loss_scale`` in amp, ...); the attributes they use are
    made here, in ``__init__``.
    """

    _step_supports_amp_scaling = True

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        decay: str = "decoupled",
        stage: int = 2,
        process_group=None,
        device_mesh=None,
        bucket_size: int | None = None,
        master_dtype: torch.dtype | None = torch.float32,
        max_grad_norm: float | None = None,
        grads_reduced: bool = False,
        reduce_dtype: torch.dtype | None = None,
        impl: str = "auto",
        step_in_backward: bool = False,
        rule: str = "adamw",
        adalomo_eps: tuple[float, float] = (1e-30, 1e-3),
        clip_threshold: float = 1.0,
        decay_rate: float = -0.8,
        wd_schedule: WdSchedule = None,
        wd_schedule_steps: int | None = None,
        param_views: bool = True,
        overlap_param_gather: bool = False,
        state_dtype: str | None = None,
        kahan_sum: bool = False,
    ) -> None:
        self._wd_default = (wd_schedule, wd_schedule_steps)
        defaults = dict(lr=lr, betas=tuple(betas) if isinstance(betas, list) else betas, eps=eps,
                        weight_decay=weight_decay, decay=decay)
        self._rule = get_rule(rule)
        defaults.update(self._rule.check_hyper(dict(adalomo_eps=adalomo_eps, clip_threshold=clip_threshold,
                                                    decay_rate=decay_rate)))
        validate_hyper(defaults)
        validate_options(stage=stage, bucket_size=bucket_size, master_dtype=master_dtype, reduce_dtype=reduce_dtype,
                         grads_reduced=grads_reduced, impl=impl, step_in_backward=step_in_backward,
                         param_views=param_views, overlap_param_gather=overlap_param_gather,
                         state_dtype=state_dtype, kahan_sum=kahan_sum, rule=rule)
        self.stage = stage
        self.state_dtype, self.kahan_sum = state_dtype, kahan_sum
        params = materialise_params(params)
        self._fsdp = check_fsdp_options(params, process_group=process_group, device_mesh=device_mesh,
                                        step_in_backward=step_in_backward, rule=self._rule)
        self.bucket_size = auto_bucket_size(trainable_numel(params)) if bucket_size is None else bucket_size
        self.master_dtype = master_dtype
        self.reduce_dtype = reduce_dtype
        self.impl = impl
        self.rule = rule
        self.step_in_backward = bool(step_in_backward)
        self.param_views = param_views
        self.comm = make_comm(process_group, device_mesh)
        self.engine = GradEngine(stage, grads_reduced, step_in_backward=self.step_in_backward)
        self.engine.gathers.on = overlap_param_gather
        self.max_grad_norm = max_grad_norm  # (a property: with step_in_backward it picks fused vs exact clipping)
        self.grad_norm_tensor = torch.zeros((), dtype=torch.float32)  # grad_norm as a 0-d tensor, updated in place
        self.engine.release_check = _weak(self, "_check_plain", gone=True)  # no optimizer: leave param.grad alone
        self.engine.on_moved = _weak(self, "_on_bucket_moved")
        # another system partitions -- DeepSpeed ZeRO (detected at the first step) or FSDP2 (DTensor params, known
        # now) --: act as a plain AdamW over param_groups (FSDP2: on the local shards, zeroadamw.plain)
        self._plain = self._fsdp
        self._control: Control | None = None
        # fused step in backward: per-group sum of grad^2 and the count of non-finite buckets already applied this
        # step, accumulated on the device (read once, in step()'s packed control read)
        self._applied_sq: Tensor | None = None
        self._applied_bad: Tensor | None = None
        self._state_loaded = False  # state came from load_state_dict / zeroadamw.checkpoint (resume check)
        self._attached_scaler = None  # the GradScaler of attach_grad_scaler() (its attribute protocol)
        self.group_grad_norms: list[float] = []
        self.grad_norm: float | None = None
        self.last_step_skipped = False
        self.skipped_steps = 0
        self.skipped_buckets = 0
        self._device: torch.device | None = None
        self._seen: set[Tensor] = set()
        self._state_ready = False
        self._constructed = False
        self._resume_checked = False
        self._master_stale: set[Tensor] = set()  # low-precision params whose master must be (re)read from the param
        self._layout_signature: list = []
        super().__init__(params, defaults)
        self.control  # noqa: B018 - build the control plane now that the params' device is known
        self._check_same_layout(self._layout_signature)
        self._bind_params(self.engine.buckets)
        self._constructed = True
        if not self.engine.buckets and not self._fsdp:
            raise ValueError(
                "ShardedAdamW got no trainable parameters (every parameter has requires_grad=False or is empty). "
                "For LoRA/PEFT, build the optimizer after get_peft_model(...) so the adapters are trainable."
            )

    @property
    def max_grad_norm(self) -> float | None:
        """Global-norm clipping threshold (None: off). With step_in_backward, None means the fused variant (update
        in backward) and a value means the exact variant (update in step()); changing it switches between them
        (between steps)."""
        return self._max_grad_norm

    @max_grad_norm.setter
    def max_grad_norm(self, value: float | None) -> None:
        self._max_grad_norm = validate_max_grad_norm(value)
        fused = self.step_in_backward and value is None
        self.engine.apply_fn, self.engine.agree_fn = engine_callbacks(self) if fused else (None, None)

    @property
    def control(self) -> Control:
        """The control plane (:mod:`zeroadamw.control`): small collectives on the params' device."""
        if self._control is None:
            self._control = Control(self.comm.world, self._device)  # every rank agrees (a mesh: every row)
            self.engine.control = self._control
        return self._control

    # ------------------------------------------------------------------------------------------ param groups
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if not isinstance(param_group, dict):
            raise TypeError(f"param group must be a dict, got {type(param_group).__name__}")
        params, self._device = check_params(param_group["params"], self._seen, self._device)
        param_group = dict(param_group, params=params)
        for k, v in self.defaults.items():
            param_group.setdefault(k, v)
        if isinstance(param_group["betas"], list):
            param_group["betas"] = tuple(param_group["betas"])
        validate_hyper(param_group, f" (param group {len(self.param_groups)})")
        lr0 = param_group["lr"]
        param_group.setdefault("initial_lr", lr0.clone() if isinstance(lr0, Tensor) else lr0)
        wd_fn = self._wd_take(param_group, *self._wd_default)
        super().add_param_group(param_group)
        self._wd_register(self.param_groups[-1], wd_fn)
        self._seen.update(params)
        gi = len(self.param_groups) - 1
        if self._fsdp:  # FSDP2 shards: no buckets, no hooks, the plain step on the local shards
            return
        buckets, signature = self._make_buckets(gi)
        for bucket in buckets:
            self.engine.add_bucket(bucket)
        if self._constructed:  # a group added later: check it now (every rank must add it)
            self._check_same_layout(signature)
            self._bind_params(buckets)
        else:
            self._layout_signature.append(signature)
        if self._state_ready:
            for bucket in buckets:
                self._init_bucket_state(bucket)

    def _make_buckets(self, gi: int) -> tuple[list[Bucket], list]:
        """The buckets of param group ``gi`` and their layout signature (SparseAdamW adds row buckets and expert
        groups)."""
        group = self.param_groups[gi]
        buckets, entries = dense_buckets(group["params"], gi, self.comm, self.bucket_size, self.master_dtype,
                                         self.reduce_dtype, in_backward=self.step_in_backward,
                                         state_dtype=self.state_dtype, kahan=self.kahan_sum)
        return buckets, [gi, len(group["params"]), *entries]

    # ------------------------------------------------------------------------------------------- accumulation
    @contextlib.contextmanager
    def no_sync(self):
        """Backward passes inside this context communicate nothing; gradients accumulate in ``param.grad``.

        Run every micro-batch but the last inside it; the last backward (outside) reduces the sum. Like
        ``DistributedDataParallel.no_sync``. With ``step_in_backward`` every backward still reduces (into an fp32
        1/N accumulator: full-size gradients would undo its memory saving); ``no_sync()`` then only marks "not the
        last micro-batch", so the update waits for the backward outside it.
        """
        self.engine.enter_no_sync()
        try:
            yield
        finally:
            self.engine.exit_no_sync()

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear ``param.grad`` and the gradients accumulated (sharded) inside the optimizer."""
        super().zero_grad(set_to_none=set_to_none)
        self.engine.clear()

    def wait_params(self) -> None:
        """Wait until every param holds its updated value: with ``overlap_param_gather=True``, before reading
        params outside a module's forward (``model.state_dict()``, an EMA copy, ``p.detach()``)."""
        self.engine.gathers.wait_all()

    def comm_counters(self, by_dim: bool = False) -> dict:
        """Collective calls and bytes sent by this rank since the last :meth:`reset_comm_counters`: ``op ->
        {"calls", "bytes"}``; ``by_dim=True``: per mesh dimension, ``{"shard": ..., "replicate": ...,
        "world": ...}`` (a flat group: ``{"shard": ...}``)."""
        return self.comm.counters(by_dim=by_dim)

    def reset_comm_counters(self) -> None:
        self.comm.reset_counters()

    # ------------------------------------------------------------------------------------------------- step
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None, grad_scaler=None):
        """Reduce gradients (what backward has not already), update the owned shard, all-gather params.

        ``grad_scaler`` is passed by ``torch.amp.GradScaler.step``: gradients are unscaled inside the update, the
        inf/NaN check covers every rank's shard, and the scaler is told the *global* result so every rank backs
        off its scale together.
        """
        self._before_step()
        out = self._step(closure, grad_scaler)
        self._after_step()
        return out

    def _before_step(self) -> None:
        """Subclass hook (SparseAdamW): runs first in every ``step()``; overriding ``step`` would run torch's
        step hooks twice."""

    def _after_step(self) -> None:
        """Subclass hook: runs last in every ``step()`` (taken, skipped or plain)."""

    def _step(self, closure, grad_scaler):
        """The phases of docs/ARCHITECTURE.md: reduce, agree, (skip), update + all-gather."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._record_step_hparams()
        if self._check_plain():  # another system partitions (DeepSpeed, FSDP2): a plain AdamW over param_groups
            if self._fsdp and not self._fsdp_agree(grad_scaler):
                return loss  # a non-finite gradient somewhere: skipped on every rank
            self._plain_step()
            self._advance_wd_schedule()
            return loss
        self._relocate_if_needed()
        local_errors = self._local_checks()
        self.engine.reduce()  # phases 1-3 (docs/ARCHITECTURE.md): reduce what backward has not; launch order
        self._init_state()
        if not self._resume_checked:
            self._warn_if_resumed_without_state()
        scale = self._loss_scale(grad_scaler)  # a 0-d device tensor, or None (amp.py)
        errors = local_errors + self._scaler_errors(scale) + self.engine.errors
        agreed = self._agree_step(errors, scale)  # phase 4: the one packed all-reduce and the one host read
        if agreed["error"]:
            self._raise_agreed(errors)
        self.engine.demote(agreed["flushed"])
        finite = self._record_norms(agreed, grad_scaler)
        if not finite:  # non-finite anywhere: skip on every rank, nothing changed
            self.skipped_steps += 1
            self.engine.clear()
            return loss
        coef = F.clip_coefficient(self.grad_norm, self.max_grad_norm)
        divide = (agreed["scale"] if agreed["scale"] is not None else 1.0) / coef
        # one 0-d device tensor per step (a fill, no host-to-device copy), shared by every bucket's kernel
        grad_scale = None if divide == 1.0 else torch.full((), divide, dtype=torch.float32, device=self._device)
        self._update_and_gather(agreed["present"], grad_scale)  # phases 5-6: update the owned shards, all-gather
        self.engine.clear()
        self._advance_wd_schedule()
        return loss

    def _record_norms(self, agreed: dict[str, Any], grad_scaler) -> bool:
        """``grad_norm`` / ``group_grad_norms`` from the agreed statistics (unscaled); tell GradScaler the global
        inf check. Returns whether the step is finite."""
        scale_f, totals = agreed["scale"], agreed["group_sq"]
        total_sq = sum(totals)
        norm = math.sqrt(total_sq) if math.isfinite(total_sq) else float("nan")
        if scale_f is not None:
            norm /= scale_f
        if agreed["applied_bad"] or agreed["found_inf"]:
            norm = float("nan")  # part of this step's gradient was not finite (those buckets were skipped)
            self.skipped_buckets += int(agreed["applied_bad"])
        self.grad_norm = norm
        self.grad_norm_tensor.fill_(norm)
        self.group_grad_norms = [math.sqrt(t) / (scale_f or 1.0) if math.isfinite(t) else float("nan") for t in totals]
        finite = math.isfinite(norm)
        self._reset_applied()
        if grad_scaler is not None and grad_scaler.is_enabled():
            self._report_found_inf(grad_scaler, not finite)
        elif self._attached_scaler is not None:
            self._report_found_inf(self._attached_scaler, not finite)
        self.last_step_skipped = not finite
        return finite

    def _update_and_gather(self, present: list[bool], grad_scale: Tensor | None) -> None:
        """Per bucket (not already updated in backward, some param present): update the owned shard, start its
        all-gather, wait for the previous bucket's (one in flight: the gather overlaps the next update)."""
        pos = 0
        pending = None
        for bucket in self.engine.buckets:
            n = len(bucket.params)
            here = present[pos : pos + n]
            pos += n
            if bucket.applied or not any(here):
                continue
            self._update_bucket(bucket, here, grad_scale)
            handle = self.engine.gathers.keep(bucket, bucket.gather_params([i for i in range(n) if here[i]]))
            if handle is None:  # one process, or left in flight for the next forward (overlap_param_gather)
                continue
            if pending is not None:
                pending.wait()
            pending = handle
        if pending is not None:
            pending.wait()

    def _update_bucket(self, bucket: Bucket, present: list[bool], grad_scale: Tensor | None) -> None:
        """Update the owned parts of ``bucket``'s present params (``present``: agreed over the ranks)."""
        if not self._rule.elementwise:  # every rank with a present param takes part in the rule's all-reduces
            return self._rule.update_bucket(self, bucket, present, grad_scale)
        idx, lonely_steps = [], []
        for i, s in enumerate(bucket.layout.slots):
            if not present[i]:
                continue
            if s.owned:
                idx.append(i)
            else:  # present somewhere, none of it owned here: keep the replicated step count in sync
                lonely_steps.append(self.state[bucket.params[i]]["step"])
        if lonely_steps:
            torch._foreach_add_(lonely_steps, 1)
        if idx:
            self._kernel(bucket, idx, self.param_groups[bucket.group_index], grad_scale, None)



ShardedAdamW._copy_base = ShardedAdamW  # copies are rebuilt through this constructor (consolidation.py)
