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
stage 1                       p Ψ              p Ψ (+ one bucket at step)    (8Ψ (+4Ψ)) / N
stage 2                       p Ψ              ≤ 3 buckets + 4Ψ/N shard      (8Ψ (+4Ψ)) / N
============================ ================ ============================= ==============================

Gradient accumulation: backward passes under :meth:`ShardedAdamW.no_sync` communicate nothing; gradients
accumulate in ``param.grad`` (full size, like DDP's ``no_sync``) and are reduced by the next backward outside it.
Backward passes *outside* ``no_sync`` each reduce-scatter and accumulate into the 1/N shard (k times the
communication, 1/N of the memory) -- choose per job.
"""

from __future__ import annotations

import contextlib
import copy
import math
import warnings
import weakref
import zlib
from typing import Any, Callable, Iterable

import torch
from torch import Tensor

from . import functional as F
from .comm import Comm
from .control import Control
from .engine import Bucket, GradEngine
from .layout import plan_buckets
from .schedules import WdSchedule, WdScheduleMixin

__all__ = ["ShardedAdamW", "DEFAULT_BUCKET_SIZE"]

DEFAULT_BUCKET_SIZE = 2**23
"""Elements per communication bucket: 8.4M (16 MiB of bf16 gradients, 32 MiB of fp32). Large enough for
collectives to reach full bandwidth (DDP's default is 25 MB), small enough that several buckets overlap with
backward and that the transient full-size buffers (at most three buckets) stay small. Raise it for very large
models on fast interconnects (Megatron uses 40M), lower it for small models to get any overlap at all."""

# GradScaler passes itself as ``grad_scaler=`` to optimizers whose step() accepts it, with a FutureWarning
# about a replacement contract that cannot express a sharded optimizer's global inf check. We rely on the
# working contract; silence only that message.
warnings.filterwarnings("ignore", message="GradScaler is going to stop passing itself", category=FutureWarning)

_HYPER = ("lr", "betas", "eps", "weight_decay", "decay")
RULES = ("adamw", "lomo", "adalomo")


def _weak_release(opt: "ShardedAdamW"):
    ref = weakref.ref(opt)

    def check() -> bool:
        o = ref()
        return o is None or o._check_plain()

    return check


def _weak_moved(opt: "ShardedAdamW"):
    """The engine's callback after a bucket moved device, holding the optimizer weakly."""
    ref = weakref.ref(opt)

    def moved(bucket):
        o = ref()
        if o is not None:
            o._on_bucket_moved(bucket)

    return moved


def _weak_apply(opt: "ShardedAdamW"):
    """The engine's fused-update callback, holding the optimizer weakly (no reference cycle through hooks)."""
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
_UNSUPPORTED = {"amsgrad": False, "maximize": False, "capturable": False, "differentiable": False}


def _lr_max(group: dict) -> float:
    """The peak lr ``decay="independent"`` divides by: OneCycleLR's ``max_lr`` when present (its ``initial_lr`` is
    the starting lr, max_lr / div_factor), else ``initial_lr`` (set by LR schedulers and at construction)."""
    v = group.get("max_lr", group.get("initial_lr", group["lr"]))
    return float(v.item() if isinstance(v, Tensor) else v)


def _validate_hyper(group: dict, where: str = "") -> None:
    lr, betas, eps, wd, decay = (group[k] for k in _HYPER)
    if isinstance(lr, Tensor):
        if lr.numel() != 1:
            raise ValueError(f"Tensor lr must be 1-element{where}")
        lr = lr.item()
    if not isinstance(lr, (int, float)) or isinstance(lr, bool):
        raise TypeError(f"lr must be a float{where}, got {type(lr).__name__}")
    if not 0.0 <= lr:
        raise ValueError(f"Invalid learning rate: {lr}{where}")
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"betas must be a pair (beta1, beta2){where}, got {betas!r}")
    for i, b in enumerate(betas):
        if not isinstance(b, (int, float)) or isinstance(b, bool):
            raise TypeError(f"beta parameter at index {i} must be a float{where}, got {type(b).__name__}")
        if not 0.0 <= b < 1.0:
            raise ValueError(f"Invalid beta parameter at index {i}: {b}{where}")
    if not isinstance(eps, (int, float)) or isinstance(eps, bool):
        raise TypeError(f"eps must be a float{where}, got {type(eps).__name__}")
    if not 0.0 <= eps:
        raise ValueError(f"Invalid epsilon value: {eps}{where}")
    if not isinstance(wd, (int, float)) or isinstance(wd, bool):
        raise TypeError(f"weight_decay must be a float{where}, got {type(wd).__name__}")
    if not 0.0 <= wd:
        raise ValueError(f"Invalid weight_decay value: {wd}{where}")
    if decay not in F.DECAY_MODES:
        raise ValueError(f"Unknown decay mode {decay!r}{where}; expected one of {', '.join(F.DECAY_MODES)}")
    if decay == "independent":
        lr0 = _lr_max(group)
        if wd and not lr0 > 0:
            raise ValueError(f"decay='independent' divides by the group's initial lr, which is {lr0}{where}")
    for key, ok in _UNSUPPORTED.items():
        if group.get(key, ok) != ok:
            raise ValueError(f"ShardedAdamW does not implement {key}={group[key]!r}{where}; remove it from the group")


def _sum_of_squares(tensors: list[Tensor], device: torch.device) -> Tensor:
    """sum(t.square().sum()) over the tensors, as a 0-d float64 tensor on ``device`` (no host read): ``dot``
    (BLAS, one read at full memory bandwidth) for fp32/fp64, ``_foreach_norm`` accumulating in fp32 for half
    precision."""
    parts = []
    wide = [t.reshape(-1) for t in tensors if t.dtype in (torch.float32, torch.float64) and t.numel()]
    narrow = [t for t in tensors if t.dtype not in (torch.float32, torch.float64) and t.numel()]
    if wide:
        parts.append(torch.stack([torch.dot(t, t).double() for t in wide]).sum())
    if narrow:
        parts.append(torch.stack(torch._foreach_norm(narrow, 2, dtype=torch.float32)).double().square().sum())
    if not parts:
        return torch.zeros((), dtype=torch.float64, device=device)
    out = sum(parts)
    return out if out.device == device else out.to(device)


def plain_adamw_step(param_groups: list[dict], state, impl: str, who: str) -> None:
    """One unsharded AdamW step over ``param_groups`` with torch-style per-param ``state`` (lazily created): what
    :class:`zeroadamw.AdamW` does, and ShardedAdamW when another system partitions (DeepSpeed's client).

    As in ``torch.optim``: complex params are updated as real views (param, grad and moments through
    ``torch.view_as_real``; the state stays complex), and a ``step`` that is not a 0-d float32 tensor on the param's
    device (a Python float from an old state dict) is converted first. Params, grads and moments of any strides
    are fine: :func:`zeroadamw.functional.adamw` sends mismatched layouts past the fused kernel."""
    for group in param_groups:
        by_kind: dict[tuple, tuple[list, ...]] = {}
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise TypeError(f"{who} does not take sparse gradients (use SparseAdamW for nn.Embedding(sparse=True))")
            st = state[p]
            if not st:
                st["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            step = st["step"]
            if not isinstance(step, Tensor) or step.dtype != torch.float32 or step.device != p.device:
                st["step"] = torch.as_tensor(float(step), dtype=torch.float32).to(p.device)
            tensors = (p, p.grad, st["exp_avg"], st["exp_avg_sq"])
            if p.is_complex():
                tensors = tuple(torch.view_as_real(t) for t in tensors)
            lists = by_kind.setdefault((p.device, tensors[0].dtype), ([], [], [], [], []))
            for lst, t in zip(lists, (*tensors, st["step"])):
                lst.append(t)
        beta1, beta2 = group["betas"]
        for params, grads, m, v, steps in by_kind.values():
            F.adamw(params, grads, m, v, steps, lr=float(group["lr"]), beta1=beta1, beta2=beta2,
                    eps=group["eps"], weight_decay=group["weight_decay"], decay=group["decay"],
                    lr_max=_lr_max(group), impl=impl)


def complete_loaded_state(opt: torch.optim.Optimizer, state: dict[str, Any]) -> dict[str, Any]:
    """What torch's ``load_state_dict`` hands ``__setstate__``, completed for our optimizers: torch's groups get
    the zeroadamw keys they lack (validated), float steps become tensors. Changes nothing of ``opt``."""
    state = dict(state)
    if "param_groups" in state:
        state["param_groups"] = ShardedAdamW._completed_groups(
            state["param_groups"], opt.__dict__.get("param_groups"),
            state.get("defaults", opt.__dict__.get("defaults", {})), "loaded")
    if "state" in state:
        ShardedAdamW._steps_as_tensors(state["state"])
    return state


class ShardedAdamW(WdScheduleMixin, torch.optim.Optimizer):
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
        bucket_size: elements per communication bucket (default :data:`DEFAULT_BUCKET_SIZE`).
        master_dtype: dtype of the sharded master weights kept for bf16/fp16 params (default fp32); ``None``
            updates low-precision params in their own dtype (state in that dtype too).
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

    After ``step()``: :attr:`grad_norm` (float, before clipping; after loss-scale unscaling),
    :attr:`group_grad_norms` (the same, per param group) and :attr:`last_step_skipped` (``True`` when a non-finite gradient anywhere skipped the step on every rank).

    Contract with the training loop: every rank runs the same number of backward passes between steps, and
    ``step()``, ``state_dict()`` and ``load_state_dict()`` are called on every rank (they are collectives).
    With stage 2, ``param.grad`` is ``None`` after backward -- gradients live, sharded, inside the optimizer;
    clip with ``max_grad_norm`` (``torch.nn.utils.clip_grad_norm_`` would see no gradients).
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
        bucket_size: int = DEFAULT_BUCKET_SIZE,
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
    ) -> None:
        self._wd_default = (wd_schedule, wd_schedule_steps)
        defaults = dict(lr=lr, betas=tuple(betas) if isinstance(betas, list) else betas, eps=eps,
                        weight_decay=weight_decay, decay=decay)
        if rule not in RULES:
            raise ValueError(f"Unknown rule {rule!r}; expected one of {', '.join(RULES)}")
        if rule == "adalomo":
            if (not isinstance(adalomo_eps, (tuple, list)) or len(adalomo_eps) != 2
                    or not all(isinstance(e, (int, float)) and e >= 0 for e in adalomo_eps)):
                raise ValueError(f"adalomo_eps must be a pair of non-negative floats, got {adalomo_eps!r}")
            if not clip_threshold > 0:
                raise ValueError(f"clip_threshold must be > 0, got {clip_threshold}")
            if not decay_rate < 0:
                raise ValueError(f"decay_rate must be < 0 (beta2_t = 1 - t**decay_rate), got {decay_rate}")
            defaults.update(adalomo_eps=tuple(adalomo_eps), clip_threshold=float(clip_threshold),
                            decay_rate=float(decay_rate))
        _validate_hyper(defaults)
        if stage not in (1, 2) or isinstance(stage, bool):
            raise ValueError(f"stage must be 1 (shard optimizer state) or 2 (also shard gradients), got {stage!r}")
        if not isinstance(bucket_size, int) or isinstance(bucket_size, bool) or bucket_size < 1:
            raise ValueError(f"bucket_size must be a positive int (elements per bucket), got {bucket_size!r}")
        if master_dtype is not None and (not isinstance(master_dtype, torch.dtype) or not master_dtype.is_floating_point):
            raise TypeError(f"master_dtype must be a floating torch.dtype or None, got {master_dtype!r}")
        if reduce_dtype is not None and (not isinstance(reduce_dtype, torch.dtype) or not reduce_dtype.is_floating_point):
            raise TypeError(f"reduce_dtype must be a floating torch.dtype or None, got {reduce_dtype!r}")
        if grads_reduced and stage != 1:
            raise ValueError(
                "grads_reduced=True (gradients already averaged by DDP) needs stage=1: stage 2 reduce-scatters "
                "gradients itself during backward, so don't wrap the model in DDP with stage=2"
            )
        if impl not in ("auto", *F.KERNELS):
            raise ValueError(f"Unknown impl {impl!r}; expected 'auto' or one of {sorted(F.KERNELS)}")
        if step_in_backward and stage != 2:
            raise ValueError("step_in_backward reduces (and updates) during backward, which is stage 2; use stage=2")
        if step_in_backward and grads_reduced:
            raise ValueError(
                "step_in_backward reduces gradients itself in backward hooks; don't wrap the model in DDP "
                "(grads_reduced=True is for DDP + stage 1)")
        self.stage = stage
        self.bucket_size = bucket_size
        self.master_dtype = master_dtype
        self.reduce_dtype = reduce_dtype
        self.impl = impl
        self.rule = rule
        self.step_in_backward = bool(step_in_backward)
        self.comm = Comm(process_group)
        self.engine = GradEngine(stage, grads_reduced, step_in_backward=self.step_in_backward)
        self.max_grad_norm = max_grad_norm  # (a property: with step_in_backward it picks fused vs exact clipping)
        self.grad_norm_tensor = torch.zeros((), dtype=torch.float32)  # grad_norm as a 0-d tensor, updated in place
        self.engine.release_check = _weak_release(self)
        self.engine.on_moved = _weak_moved(self)
        self._plain = False  # another system (DeepSpeed ZeRO) partitions: act as a plain AdamW over param_groups
        self.skipped_buckets = 0
        self._control: Control | None = None
        # fused step in backward: per-group Σ grad² and the count of non-finite buckets already applied this step,
        # accumulated on the device (read once, in step()'s packed control read)
        self._applied_sq: Tensor | None = None
        self._applied_bad: Tensor | None = None
        self._state_loaded = False  # state came from load_state_dict / zeroadamw.checkpoint (resume check)
        self.group_grad_norms: list[float] = []
        self.grad_norm: float | None = None
        self.last_step_skipped = False
        self.skipped_steps = 0
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
        self._constructed = True
        if not self.engine.buckets:
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
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"max_grad_norm must be a float or None, got {type(value).__name__}")
            if not value > 0:
                raise ValueError(f"max_grad_norm must be > 0 (or None for no clipping), got {value}")
            value = float(value)
        self._max_grad_norm = value
        fused = self.step_in_backward and value is None
        self.engine.apply_fn, self.engine.agree_fn = _weak_apply(self) if fused else (None, None)

    # ------------------------------------------------------------------------------------------ param groups
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if not isinstance(param_group, dict):
            raise TypeError(f"param group must be a dict, got {type(param_group).__name__}")
        params = param_group["params"]
        if isinstance(params, Tensor):
            params = [params]
        elif isinstance(params, set):
            raise TypeError("optimizer parameters need to be organized in ordered collections, not sets")
        params = list(params)
        ids = set()
        for p in params:
            if not isinstance(p, Tensor):
                raise TypeError(f"optimizer can only optimize Tensors, but one of the params is {type(p).__name__}")
            if p in ids or p in self._seen:
                raise ValueError(
                    "a parameter is listed twice (in one group or in two groups); list each parameter once -- "
                    "e.g. tied embeddings are one Parameter: pass model.parameters(), which deduplicates"
                )
            ids.add(p)
            if not p.is_floating_point() or p.is_complex():
                raise TypeError(f"ShardedAdamW optimizes real floating-point tensors, got a {p.dtype} parameter")
            if p.requires_grad and not p.is_contiguous():
                raise ValueError("ShardedAdamW needs contiguous parameters; make the parameter .contiguous() first")
            if not p.is_leaf:
                raise ValueError("can't optimize a non-leaf Tensor")
            if self._device is None:
                self._device = p.device
            elif p.device != self._device:
                raise ValueError(
                    f"all parameters must be on one device, got {self._device} and {p.device}; "
                    "move the model to its device before building the optimizer"
                )
        param_group = dict(param_group, params=params)
        for k, v in self.defaults.items():
            param_group.setdefault(k, v)
        if isinstance(param_group["betas"], list):
            param_group["betas"] = tuple(param_group["betas"])
        _validate_hyper(param_group, f" (param group {len(self.param_groups)})")
        lr0 = param_group["lr"]
        param_group.setdefault("initial_lr", lr0.clone() if isinstance(lr0, Tensor) else lr0)
        wd_fn = self._wd_take(param_group, *self._wd_default)
        super().add_param_group(param_group)
        self._wd_register(self.param_groups[-1], wd_fn)
        self._seen.update(params)
        self._build_buckets(len(self.param_groups) - 1)

    def _build_buckets(self, gi: int) -> None:
        group = self.param_groups[gi]
        trainable = [p for p in group["params"] if p.requires_grad and p.numel() > 0][::-1]
        by_dtype: dict[torch.dtype, list[Tensor]] = {}
        for p in trainable:  # reverse registration order ~ the order gradients appear in backward
            by_dtype.setdefault(p.dtype, []).append(p)
        signature = [gi, len(group["params"])]
        new = []
        for dtype, ps in by_dtype.items():
            master = self.master_dtype if dtype in (torch.float16, torch.bfloat16) and self.master_dtype not in (None, dtype) else None
            reduce_dtype = self.reduce_dtype or dtype
            for idx in plan_buckets([p.numel() for p in ps], self.bucket_size):
                bucket = Bucket([ps[i] for i in idx], gi, self.comm, reduce_dtype, master or dtype, master)
                self.engine.add_bucket(bucket)
                new.append(bucket)
                signature.append((str(dtype), [ps[i].numel() for i in idx]))
        if self._constructed:  # a group added later: check it now (every rank must add it)
            self._check_same_layout(signature)
        else:
            self._layout_signature.append(signature)
        if self._state_ready:
            for bucket in new:
                self._init_bucket_state(bucket)

    def _check_same_layout(self, signature: list) -> None:
        """Every rank must build the same buckets, or collectives would pair up different data."""
        if self.comm.world_size == 1:
            return
        if not self.control.check_same(zlib.crc32(repr(signature).encode())):
            raise ValueError(
                "ranks built different parameter layouts: every rank must pass the same parameters (same shapes, "
                "dtypes, requires_grad and group order) to the optimizer"
            )

    @property
    def control(self) -> Control:
        """The control plane (:mod:`zeroadamw.control`): small collectives on the params' device."""
        if self._control is None:
            self._control = Control(self.comm, self._device)
            self.engine.control = self._control
        return self._control

    def _mark_state_loaded(self) -> None:
        """Called by zeroadamw.checkpoint.load (load_state_dict sets the flag when it loads stepped state): the
        state is a resumed one, not fresh -- the resume warning is off."""
        self._state_loaded = True
        self._resume_checked = True

    # ------------------------------------------------------------------------------------------- accumulation
    @contextlib.contextmanager
    def no_sync(self):
        """Backward passes inside this context communicate nothing; gradients accumulate in ``param.grad``.

        Run every micro-batch but the last inside it; the last backward (outside) reduces the sum. Like
        ``DistributedDataParallel.no_sync``.
        """
        self.engine.enter_no_sync()
        try:
            yield
        finally:
            self.engine.exit_no_sync()

    # ------------------------------------------------------------------------------------------------ state
    def _init_state(self) -> None:
        if self._state_ready:
            return
        for bucket in self.engine.buckets:
            self._init_bucket_state(bucket)
        self._state_ready = True

    def _init_bucket_state(self, bucket: Bucket) -> None:
        bucket.init_state(moments=self.rule == "adamw")
        for i, p in enumerate(bucket.params):
            st: dict[str, Tensor] = {"step": torch.zeros((), dtype=torch.float32, device=p.device)}
            if self.rule == "adamw":
                st["exp_avg"] = bucket.shard_view(bucket.exp_avg, i)
                st["exp_avg_sq"] = bucket.shard_view(bucket.exp_avg_sq, i)
            elif self.rule == "adalomo":
                kw = dict(dtype=torch.float32, device=p.device)
                if p.ndim >= 2:  # factored second moment over the last two dims, replicated on every rank
                    st["exp_avg_sq_row"] = torch.zeros(p.shape[:-1], **kw)
                    st["exp_avg_sq_col"] = torch.zeros(p.shape[:-2] + p.shape[-1:], **kw)
                else:  # a vector: its second moment is element-wise, sharded like the param
                    st["exp_avg_sq"] = torch.zeros(bucket.layout.slots[i].owned, **kw)
            if bucket.master is not None:
                st["master"] = bucket.shard_view(bucket.master, i)
                self._master_stale.add(p)  # re-read from the param at its first update (weights may change before)
            self.state[p] = st

    def _relocate_if_needed(self) -> None:
        """The model moved after the optimizer was built: buckets, state and control tensors follow it (the
        engine does the same when a moved gradient arrives first; either way :meth:`_on_bucket_moved` runs)."""
        for bucket in self.engine.buckets:
            dev = bucket.params[0].device
            if dev != bucket.device:
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
            for k, t in list(st.items()):
                flat = getattr(bucket, k, None) if k in ("exp_avg", "exp_avg_sq", "master") else None
                if isinstance(flat, Tensor) and not (k == "exp_avg_sq" and self.rule == "adalomo"):
                    st[k] = bucket.shard_view(flat, i)
                elif isinstance(t, Tensor) and t.device != dev:
                    st[k] = t.to(dev)

    def state_bytes(self) -> int:
        """Bytes of optimizer state this rank holds: ``exp_avg`` + ``exp_avg_sq`` (+ master) of its shard (AdamW);
        the factored / sharded second moments (+ master) for AdaLomo; the master for LOMO."""
        flat = sum(b.state_bytes() for b in self.engine.buckets)
        if self.rule != "adalomo":
            return flat
        extra = sum(t.numel() * t.element_size() for st in self.state.values()
                    for k, t in st.items() if k.startswith("exp_avg_sq"))
        return flat + extra

    def comm_counters(self) -> dict[str, dict[str, int]]:
        """Collective calls and bytes sent by this rank since the last :meth:`reset_comm_counters`."""
        return self.comm.counters()

    def reset_comm_counters(self) -> None:
        self.comm.reset_counters()

    # ------------------------------------------------------------------------------------------------- step
    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear ``param.grad`` and the gradients accumulated (sharded) inside the optimizer."""
        super().zero_grad(set_to_none=set_to_none)
        self.engine.clear()

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
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._record_step_hparams()
        if self._check_plain():
            self._plain_step()
            self._advance_wd_schedule()
            return loss
        self._relocate_if_needed()
        engine = self.engine
        local_errors = self._local_checks()
        engine.reduce()
        if not self._state_ready:
            self._init_state()
        if not self._resume_checked:
            self._warn_if_resumed_without_state()

        scale = self._loss_scale(grad_scaler)  # a 0-d device tensor, or None
        if engine.fused and scale is not None:
            local_errors.append((RuntimeError, (
                "step_in_backward without max_grad_norm updates each bucket during backward, before the loss "
                "scale is known; with fp16 + GradScaler use step_in_backward=True with max_grad_norm=... (the "
                "update then waits for step()), or bf16 without a scaler")))
        errors = local_errors + engine.errors
        agreed = self._agree_step(errors, scale)  # the one packed all-reduce and the one host read of this step
        if agreed["error"]:
            self._raise_agreed(errors)
        present = agreed["present"]
        engine.demote(agreed["flushed"])
        scale_f = agreed["scale"]
        totals = agreed["group_sq"]
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
        if not finite:
            self.skipped_steps += 1
            engine.clear()
            return loss

        coef = F.clip_coefficient(norm, self.max_grad_norm)
        divide = (scale_f if scale_f is not None else 1.0) / coef
        # one 0-d device tensor per step (a fill, no host-to-device copy), shared by every bucket's kernel
        grad_scale = None if divide == 1.0 else torch.full((), divide, dtype=torch.float32, device=self._device)

        pos = 0
        pending = None
        for bucket in engine.buckets:
            n = len(bucket.params)
            here = present[pos : pos + n]
            pos += n
            if bucket.applied or not any(here):
                continue
            self._update_bucket(bucket, here, grad_scale)
            handle = engine.gather_params(bucket, [i for i in range(n) if here[i]])
            if pending is not None:
                pending.wait()
            pending = handle
        if pending is not None:
            pending.wait()
        engine.clear()
        self._advance_wd_schedule()
        return loss

    # ------------------------------------------------------------------------------------- agreement (control)
    def _agree_step(self, errors: list, scale: Tensor | None) -> dict[str, Any]:
        """Everything the ranks must agree on at ``step()``, in one all-reduce over the world group (plus one per
        expert group for the presence of its buckets' params) and one host read:

        ``[Σ shard grad² per group, error flag, found_inf (GradScaler's attribute protocol), presence per param
        of world buckets, flushed flag per launch-order bucket, non-finite buckets applied in backward]``, then,
        unreduced, the presence agreed within each expert group and the loss scale."""
        ctl, engine = self.control, self.engine
        dev = ctl.device
        group_sq = self._local_group_sq()
        if self._applied_sq is not None:
            applied = self._applied_sq.to(dev)
            if len(applied) < len(group_sq):  # a param group was added since the accumulator was made
                applied = torch.cat([applied, applied.new_zeros(len(group_sq) - len(applied))])
            group_sq = group_sq + applied
        world_flags, other = [], {}
        for bucket in engine.buckets:
            if bucket.comm is self.comm:
                world_flags.extend(bucket.present)
            else:
                other.setdefault(id(bucket.comm), (bucket.comm, []))[1].extend(bucket.present)
        flushed = engine.flushed_flags()
        found = getattr(self, "found_inf", None)
        parts = [group_sq,
                 ctl.host_vector([float(bool(errors))], torch.float64),
                 (found.to(dev, torch.float64).reshape(1) if isinstance(found, Tensor)
                  else ctl.host_vector([float(bool(found))], torch.float64)),
                 ctl.host_vector(world_flags, torch.float64),
                 ctl.host_vector(flushed, torch.float64),
                 (self._applied_bad.to(dev, torch.float64).reshape(1) if self._applied_bad is not None
                  else ctl.host_vector([0.0], torch.float64))]
        stats = torch.cat(parts)
        after = []
        for comm, flags in other.values():  # expert groups: agree within the group (its ranks hold the same tensors)
            after.append(ctl.all_reduce_packed(ctl.host_vector(flags, torch.float64, ctl.device_for(comm)).clone(),
                                               comm=comm).to(dev))
        ctl.all_reduce_packed(stats)
        if scale is not None:
            after.append(scale.to(dev, torch.float64).reshape(1))
        host = torch.cat([stats, *after]).tolist() if after else stats.tolist()  # THE host read of the step
        G = len(group_sq)
        k = G + 2
        world_present = [x > 0 for x in host[k : k + len(world_flags)]]
        k += len(world_flags)
        flushed_any = [x > 0 for x in host[k : k + len(flushed)]]
        k += len(flushed)
        applied_bad = host[k]
        k += 1
        agreed_other = {}
        for cid, (comm, flags) in other.items():
            agreed_other[cid] = [x > 0 for x in host[k : k + len(flags)]]
            k += len(flags)
        present, wi, oi = [], 0, {cid: 0 for cid in other}
        for bucket in engine.buckets:  # back to update order
            n = len(bucket.params)
            if bucket.comm is self.comm:
                present.extend(world_present[wi : wi + n])
                wi += n
            else:
                cid = id(bucket.comm)
                present.extend(agreed_other[cid][oi[cid] : oi[cid] + n])
                oi[cid] += n
        return {"group_sq": host[:G], "error": host[G] > 0, "found_inf": host[G + 1] > 0, "present": present,
                "flushed": flushed_any, "applied_bad": applied_bad, "scale": host[k] if scale is not None else None}

    def _reset_applied(self) -> None:
        if self._applied_sq is not None:
            self._applied_sq.zero_()
            self._applied_bad.zero_()

    def _agree_in_backward(self, bucket: Bucket):
        """Fused step in backward, phase 1: ``bucket``'s reduced gradient of the last micro-batch is ready -- start
        the agreement with the other ranks on which of its params got a gradient and whether it is finite (one
        small async all-reduce whose result stays on the device). The engine applies it a fixed number of buckets
        later (:meth:`_apply_in_backward`), so the all-reduce overlaps the rest of backward."""
        held = bucket.reduced_grads()
        sq = _sum_of_squares(held, bucket.device)
        ctl = self.control
        cdev = ctl.device_for(bucket.comm)
        flags = torch.cat([ctl.host_vector(bucket.present, torch.float32, cdev),
                           (~torch.isfinite(sq)).to(device=cdev, dtype=torch.float32).reshape(1)])
        return bucket, sq, flags, ctl.all_reduce_packed(flags, comm=bucket.comm, async_op=True)

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
        self._applied_sq[bucket.group_index] += sq
        self._applied_bad += bad
        if not self._state_ready:
            self._init_state()
        if not self._resume_checked:
            self._warn_if_resumed_without_state()
        if self.rule == "adalomo":  # its per-parameter scalars are read on the host: one read per bucket
            present = (flags[:n] > 0).tolist()
            if bad.item() or not any(present):
                bucket.release_grads()
                return None
            self._update_bucket(bucket, present, None)
            handle = self.engine.gather_params(bucket, [i for i in range(n) if present[i]])
        else:
            self._update_bucket_masked(bucket, flags[:n], bad)
            handle = self.engine.gather_params(bucket, list(range(n)))
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

    # ------------------------------------------------------------------------------------------- plain mode
    def _check_plain(self) -> bool:
        """DeepSpeed ZeRO (and its fp16/bf16 wrappers) hand their client optimizer flat fp32 partitions by
        replacing the tensors in ``param_groups``: DeepSpeed shards, so we must not. Detect that (params we were
        not built with) and act, from then on, as a plain AdamW over whatever ``param_groups`` holds."""
        if self._plain:
            return True
        if all(p in self._seen for g in self.param_groups for p in g["params"]):
            return False
        if self.rule != "adamw":
            raise ValueError(
                f"rule={self.rule!r} cannot run as another system's client optimizer (DeepSpeed partitions the "
                "state and hands over flat partitions); use rule='adamw' there")
        self._plain = True
        self.engine.remove_hooks()
        self.engine.clear()
        self.state.clear()  # nothing of ours refers to the new tensors; torch-style per-param state from here on
        for b in self.engine.buckets:
            b.exp_avg = b.exp_avg_sq = b.master = None
        self._state_ready = False
        import logging

        logging.getLogger("zeroadamw").info(
            "ShardedAdamW: param_groups were replaced (DeepSpeed ZeRO partitions itself); acting as a plain AdamW")
        return True

    def _plain_step(self) -> None:
        plain_adamw_step(self.param_groups, self.state, self.impl, "ShardedAdamW as DeepSpeed's client optimizer")

    def _local_checks(self) -> list[tuple[type, str]]:
        """Problems this rank can see before any collective; reported with the others' in the control all-reduce."""
        errors = []
        for gi, group in enumerate(self.param_groups):
            for p in group["params"]:
                if p in self.engine.where:
                    if not p.is_contiguous():
                        errors.append((ValueError, f"a parameter of param group {gi} became non-contiguous after the "
                                       "optimizer was built (e.g. channels_last); ShardedAdamW needs contiguous params"))
                elif p.requires_grad and p.numel() > 0 and p.grad is not None:
                    errors.append((ValueError, (
                        f"a parameter of param group {gi} was frozen when the optimizer was built and now has a "
                        "gradient; ShardedAdamW lays out its buffers at construction -- build the optimizer after "
                        "choosing what to train (or put newly unfrozen params in opt.add_param_group)")))
        return errors

    def _raise_agreed(self, errors: list[tuple[type, str]]) -> None:
        """Some rank found a problem: every rank raises (nothing was changed), with the first rank's message."""
        self.engine.clear()
        self._reset_applied()
        self.control.agree_errors(errors)

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
            import sys

            print("WARNING " + msg, file=sys.stderr, flush=True)
        for b in self.engine.buckets:
            for p in b.params:
                if hasattr(p, "_zeroadamw_resumed_step"):
                    delattr(p, "_zeroadamw_resumed_step")

    # --------------------------------------------------------------------------------------------- GradScaler
    _attached_scaler = None

    def attach_grad_scaler(self, scaler) -> None:
        """Tell the optimizer which ``torch.amp.GradScaler`` drives it, for GradScaler's attribute protocol
        (``optimizer.grad_scale`` / ``optimizer.found_inf`` set before ``step()``, which torch uses when ``step``
        has no ``grad_scaler`` argument -- e.g. behind a wrapper -- and will use for every optimizer): the global
        inf check is then written back into the scaler's state so every rank backs off together."""
        self._attached_scaler = scaler

    def _loss_scale(self, grad_scaler) -> Tensor | None:
        """The loss scale still in the gradients, as a 0-d tensor on its device (None: unscaled). No host read."""
        if grad_scaler is None or not grad_scaler.is_enabled():
            new_contract = getattr(self, "grad_scale", None)  # GradScaler set it and called step() without itself
            if new_contract is None:
                return None
            visible = self.comm.world_size == 1 or self.engine.grads_reduced
            if not visible and self._attached_scaler is None:
                raise RuntimeError(
                    "GradScaler called ShardedAdamW.step() without passing itself (its attribute protocol, used "
                    "behind wrappers such as accelerate's patched step). With gradients reduced inside the "
                    "optimizer, every rank's inf check must agree and the scaler must be told the global result: "
                    "call opt.attach_grad_scaler(scaler) once after building both."
                )
            t = new_contract if isinstance(new_contract, Tensor) else torch.full((), float(new_contract))
            return t.to(self._device, torch.float32)
        from torch.amp.grad_scaler import OptState

        state = grad_scaler._per_optimizer_states[id(self)]
        # did unscale_() see (and unscale in place) the gradients? Only where they were in param.grad at step time
        visible = self.comm.world_size == 1 or self.stage == 1 or self.engine.packed_at_step
        if state["stage"] is OptState.UNSCALED and visible:
            return None
        return grad_scaler._get_scale_async().to(self._device, torch.float32)

    def _report_found_inf(self, grad_scaler, found: bool) -> None:
        state = grad_scaler._per_optimizer_states[id(self)]
        dev = grad_scaler._scale.device if grad_scaler._scale is not None else self._device
        state["found_inf_per_device"] = {dev: torch.full((), float(found), dtype=torch.float32, device=dev)}

    def _local_group_sq(self) -> Tensor:
        """This rank's share of the squared gradient norm of each param group: a ``[G]`` float64 device tensor."""
        engine = self.engine
        dev = self.control.device
        per_group: list[list[Tensor]] = [[] for _ in self.param_groups]
        for bucket in engine.buckets:
            if engine.sharded(bucket):
                per_group[bucket.group_index].extend(bucket.reduced_grads())
            else:
                idx = [i for i, s in enumerate(bucket.layout.slots) if bucket.present[i] and s.owned]
                per_group[bucket.group_index].extend(engine.grad_views(bucket, idx))
        if not per_group:
            return torch.zeros(0, dtype=torch.float64, device=dev)
        return torch.stack([_sum_of_squares(t, dev) for t in per_group])

    def _update_bucket(self, bucket: Bucket, present: list[bool], grad_scale: Tensor | None) -> None:
        group = self.param_groups[bucket.group_index]
        if self.rule == "adalomo":  # every rank with a present param takes part in its (small) all-reduces
            self._refresh_master(bucket, [i for i in range(len(present)) if present[i]])
            return self._adalomo_bucket(bucket, present, grad_scale, group)
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
            self._kernel(bucket, idx, group, grad_scale, None)

    def _kernel(self, bucket: Bucket, idx: list[int], group: dict, grad_scale: Tensor | None,
                found_inf: Tensor | None) -> None:
        """The rule's update kernel over the owned parts of params ``idx`` of ``bucket`` (master or param)."""
        self._refresh_master(bucket, idx)
        target = bucket.master if bucket.master is not None else None
        params = [bucket.shard_view(target, i) if target is not None else bucket.owned_param_view(i) for i in idx]
        grads = self.engine.grad_views(bucket, idx)
        if grads and grads[0].dtype != params[0].dtype:
            grads = [g.to(params[0].dtype) for g in grads]
        steps = [self.state[bucket.params[i]]["step"] for i in idx]
        common = dict(lr=float(group["lr"]), weight_decay=group["weight_decay"], decay=group["decay"],
                      lr_max=_lr_max(group), grad_scale=grad_scale, found_inf=found_inf)
        if self.rule == "lomo":
            F.sgd(params, grads, steps, **common)
            return
        beta1, beta2 = group["betas"]
        F.adamw(
            params,
            grads,
            [bucket.shard_view(bucket.exp_avg, i) for i in idx],
            [bucket.shard_view(bucket.exp_avg_sq, i) for i in idx],
            steps,
            beta1=beta1,
            beta2=beta2,
            eps=group["eps"],
            impl=self.impl,
            **common,
        )

    def _refresh_master(self, bucket: Bucket, idx: list[int]) -> None:
        if bucket.master is None or not self._master_stale:
            return
        for i in idx:  # first update since the state was created: the params may have changed meanwhile
            p = bucket.params[i]
            if p in self._master_stale:
                if bucket.layout.slots[i].owned:
                    bucket.shard_view(bucket.master, i).copy_(bucket.owned_param_view(i))
                self._master_stale.discard(p)

    def _adalomo_bucket(self, bucket: Bucket, present: list[bool], grad_scale: float | None, group: dict) -> None:
        """AdaLomo on the owned ranges of a bucket's present params (see functional.py for the math). Row/column
        statistics and the two per-parameter RMS values need sums over whole parameters: two small all-reduces
        per bucket make them identical on every rank."""
        eps0, eps1 = group["adalomo_eps"]
        d, rate = group["clip_threshold"], group["decay_rate"]
        lr, wd, decay = float(group["lr"]), group["weight_decay"], group["decay"]
        idx = [i for i in range(len(present)) if present[i]]
        if not idx:
            return
        grads = dict(zip(idx, self.engine.grad_views(bucket, idx) if self.engine.sharded(bucket) else
                         [bucket.owned_grad_or_empty(i) for i in idx]))
        items = []
        parts = []
        for i in idx:
            p, s = bucket.params[i], bucket.layout.slots[i]
            st = self.state[p]
            st["step"] += 1
            theta = bucket.shard_view(bucket.master, i) if bucket.master is not None else bucket.owned_param_view(i)
            th32 = theta if theta.dtype == torch.float32 else theta.float()
            g = grads[i].to(torch.float32, copy=True)
            if grad_scale is not None:
                g.div_(grad_scale)
            if decay == "l2" and wd:
                g.add_(th32, alpha=wd)
            u = g * g + eps0
            if p.ndim >= 2:
                rows, cols = F.factored_partial_sums(u, s.own_lo, tuple(p.shape))
                parts += [rows, cols]
            parts.append(th32.square().sum().reshape(1))
            items.append((i, p, s, st, theta, th32, g, u))
        sums = torch.cat([t.to(torch.float32) for t in parts])
        if bucket.comm.world_size > 1:
            bucket.comm.all_reduce(sums, label="adalomo")
        usq_parts, pos, updates = [], 0, []
        for i, p, s, st, theta, th32, g, u in items:
            beta = F.adalomo_beta2(float(st["step"]), rate)
            if p.ndim >= 2:
                R, C = p.shape[-2], p.shape[-1]
                nrow, ncol = st["exp_avg_sq_row"].numel(), st["exp_avg_sq_col"].numel()
                row_tot, col_tot = sums[pos : pos + nrow], sums[pos + nrow : pos + nrow + ncol]
                pos += nrow + ncol
                row_s, col_s = st["exp_avg_sq_row"].view(-1), st["exp_avg_sq_col"].view(-1)
                row_s.mul_(beta).add_(row_tot / C, alpha=1 - beta)
                col_s.mul_(beta).add_(col_tot / R, alpha=1 - beta)
                r = row_s.view(-1, R)
                row_factor = (r / r.mean(dim=-1, keepdim=True)).rsqrt().view(-1)
                upd = g.clone()
                F.factored_scale(upd, s.own_lo, tuple(p.shape), row_factor, col_s.rsqrt())
            else:
                v = st["exp_avg_sq"]
                v.mul_(beta).add_(u, alpha=1 - beta)
                upd = g * v.rsqrt()
            psq = sums[pos]
            pos += 1
            usq_parts.append(upd.square().sum().reshape(1))
            updates.append((p, s, theta, th32, upd, psq))
        usq = torch.cat(usq_parts)
        if bucket.comm.world_size > 1:
            bucket.comm.all_reduce(usq, label="adalomo")
        for (p, s, theta, th32, upd, psq), sq in zip(updates, usq.tolist()):
            n = p.numel()
            upd.div_(max(1.0, math.sqrt(sq / n) / d))
            gamma = lr * max(eps1, math.sqrt(float(psq) / n))
            if wd and decay != "l2":
                th32.mul_(1 - gamma * F.effective_weight_decay(decay, wd, _lr_max(group)))
            th32.add_(upd, alpha=-gamma)
            if th32 is not theta:
                theta.copy_(th32)

    # ---------------------------------------------------------------------------------------- state_dict
    def _index(self) -> list[Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def _state_kinds(self, p: Tensor) -> dict[str, tuple[str, Tensor]]:
        """This rank's state of ``p`` by kind, and how it is laid out across ranks:

        * ``("range", t)`` -- the owned elements ``own_lo:own_hi`` of a tensor shaped like ``p`` (sharded);
        * ``("rows", t)`` -- the owned rows ``rows_lo:rows_hi`` of a ``[p.shape[0]]`` tensor (row-sharded params'
          per-row step counts, SparseAdamW);
        * ``("full", t)`` -- a whole tensor every rank holds identically;
        * ``("scalar", t)`` -- a 0-d tensor every rank holds identically (the step count).
        """
        out = {}
        for k, t in self.state[p].items():
            if k == "step":
                out[k] = ("scalar", t)
            elif k in ("exp_avg_sq_row", "exp_avg_sq_col"):
                out[k] = ("full", t)
            else:
                out[k] = ("range", t)
        return out

    def _state_shape(self, p: Tensor, how: str, t: Tensor) -> tuple[int, ...]:
        """The consolidated (whole-model) shape of a state kind of ``p``."""
        if how == "range":
            return tuple(p.shape)
        if how == "rows":
            return (p.shape[0],)
        return tuple(t.shape)

    def _gather_kind(self, bucket: Bucket, k: str, how: str, dtype: torch.dtype) -> Tensor:
        """All-gather one sharded state kind of a bucket into its padded flat layout (rows: padded row layout)."""
        if how == "range":
            flat = getattr(bucket, k, None) if k in ("exp_avg", "exp_avg_sq", "master") else None
            if flat is None:  # per-param ranges (AdaLomo's vector moments): pack into a flat shard first
                flat = torch.zeros(bucket.layout.shard, dtype=dtype, device=bucket.device)
                for i, p in enumerate(bucket.params):
                    if k in self.state[p]:
                        bucket.shard_view(flat, i).copy_(self.state[p][k])
            return self._gather_flat(bucket, flat)
        # rows: one param per row-sharded bucket; every rank sends its padded share of rows
        p = bucket.params[0]
        per = bucket.layout.shard // (p.numel() // p.shape[0])
        local = torch.zeros(per, dtype=dtype, device=bucket.device)
        t = self.state[p][k]
        local[: t.numel()].copy_(t)
        out = torch.empty(per * bucket.comm.world_size, dtype=dtype, device=bucket.device)
        bucket.comm.all_gather(out, local, async_op=False)
        return out

    def _rows_range(self, bucket: Bucket, i: int) -> tuple[int, int]:
        p, s = bucket.params[i], bucket.layout.slots[i]
        d = p.numel() // p.shape[0]
        return s.own_lo // d, s.own_hi // d

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
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
        state_dict = self._consolidated_state_dict()
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            hook_result = post_hook(self, state_dict)
            if hook_result is not None:
                state_dict = hook_result
        return state_dict

    def _gather_flat(self, bucket: Bucket, flat: Tensor) -> Tensor:
        out = torch.empty(bucket.layout.padded, dtype=flat.dtype, device=flat.device)
        bucket.comm.all_gather(out, flat, async_op=False)
        return out

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
        if self._check_plain():
            return torch.optim.Optimizer.load_state_dict(self, state_dict)  # (hooks; then our __setstate__)
        state_dict = state_dict.copy()  # shallow, as torch: what pre-hooks edit at the top level stays theirs
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            hook_result = pre_hook(self, state_dict)
            if hook_result is not None:
                state_dict = hook_result
        self._load_consolidated(state_dict)
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def _load_consolidated(self, state_dict: dict[str, Any]) -> None:
        """:meth:`load_state_dict` without its hooks."""
        if not isinstance(state_dict, dict) or "state" not in state_dict or "param_groups" not in state_dict:
            raise ValueError("expected a torch.optim state dict with 'state' and 'param_groups' keys")
        self._relocate_if_needed()
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(
                f"loaded state dict has {len(saved_groups)} parameter groups, the optimizer has {len(self.param_groups)}"
            )
        for gi, (g, sg) in enumerate(zip(self.param_groups, saved_groups)):
            if len(g["params"]) != len(sg["params"]):
                raise ValueError(
                    f"param group {gi}: the loaded state dict has {len(sg['params'])} params, the optimizer has "
                    f"{len(g['params'])}; build the optimizer over the same param groups that were saved"
                )
        params = self._index()
        saved_ids = [i for sg in saved_groups for i in sg["params"]]
        id_to_param = dict(zip(saved_ids, params))
        new_groups = []
        for gi, (g, sg) in enumerate(zip(self.param_groups, saved_groups)):
            ng = dict(g)
            ng.update({k: copy.deepcopy(v) for k, v in sg.items() if k not in ("params", "param_names")})
            if isinstance(ng.get("betas"), list):
                ng["betas"] = tuple(ng["betas"])
            ng.setdefault("decay", g["decay"])
            _validate_hyper(ng, f" (loaded param group {gi})")
            new_groups.append(ng)
        self._init_state()  # allocating state changes nothing observable; validation below reads its shapes
        entries: list[tuple[Tensor, dict[str, Any]]] = []
        for key, st in state_dict["state"].items():
            k = int(key)
            if k not in id_to_param:
                raise ValueError(f"loaded state has an entry for param index {k}, which no param group lists")
            p = id_to_param[k]
            if p not in self.engine.where:
                continue  # frozen (or empty) now: it has no optimizer state here
            if "step" not in st:
                raise ValueError(f"param index {k}: loaded state has no 'step'")
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
        # validated: now change things
        for g, ng in zip(self.param_groups, new_groups):
            g.update({k: v for k, v in ng.items() if k != "params"})
        loaded = {p for p, _ in entries}
        for bucket in self.engine.buckets:
            for i, p in enumerate(bucket.params):
                if p not in loaded:  # trainable but never stepped when saved: fresh state, as in torch
                    for kind, (how, t) in self._state_kinds(p).items():
                        if kind == "master":
                            self._master_stale.add(p)
                        else:
                            t.zero_()
        for p, st in entries:
            bucket, i = self.engine.where[p]
            s = bucket.layout.slots[i]
            for kind, (how, t) in self._state_kinds(p).items():
                if kind == "master" and "master" not in st:
                    self._master_stale.add(p)
                    continue
                src = st[kind]
                if how == "range":
                    t.copy_(src.reshape(-1)[s.own_lo : s.own_hi])
                elif how == "rows":
                    lo, hi = self._rows_range(bucket, i)
                    t.copy_(src[lo:hi])
                elif how == "scalar":
                    t.fill_(float(src.item() if isinstance(src, Tensor) else src))
                else:
                    t.copy_(src)
                if kind == "master":
                    self._master_stale.discard(p)
        if entries:  # real (stepped) state was loaded: a resumed optimizer, not a fresh one
            self._state_loaded = True

    def _consolidated_state_dict(self) -> dict[str, Any]:
        """:meth:`state_dict` without its hooks."""
        self._relocate_if_needed()
        index = {p: k for k, p in enumerate(self._index())}
        state: dict[int, dict[str, Tensor]] = {}
        if self._state_ready:
            for bucket in self.engine.buckets:
                kinds: dict[tuple[str, str], torch.dtype] = {}
                for p in bucket.params:
                    for k, (how, t) in self._state_kinds(p).items():
                        if how in ("range", "rows"):
                            kinds.setdefault((k, how), t.dtype)
                gathered = {k: self._gather_kind(bucket, k, how, dtype) for (k, how), dtype in kinds.items()}
                for i, p in enumerate(bucket.params):
                    s = bucket.layout.slots[i]
                    entry = {}
                    for k, (how, t) in self._state_kinds(p).items():
                        if how == "range":
                            entry[k] = gathered[k][s.offset : s.offset + s.numel].view_as(p).clone()
                        elif how == "rows":
                            entry[k] = gathered[k][: p.shape[0]].clone()
                        else:
                            entry[k] = t.detach().clone()
                    if float(entry["step"].max()) == 0:
                        continue  # never updated: no state, as in torch
                    state[index[p]] = entry
        groups = []
        for group in self.param_groups:
            g = {k: v for k, v in group.items() if k not in ("params", "process_group")}
            g["params"] = [index[p] for p in group["params"]]
            groups.append(g)
        return {"state": state, "param_groups": groups}

    # ------------------------------------------------------------------------------ loading torch-format groups
    @staticmethod
    def _completed_groups(saved: list[dict], current: list[dict] | None, defaults: dict, who: str) -> list[dict]:
        """``saved`` param groups (torch's have no ``decay`` / ``initial_lr`` / weight-decay schedule keys) with the
        zeroadamw keys they lack taken from ``current`` (this optimizer's groups, None when unpickling), else from
        ``defaults``; every group validated. Raises before anything is changed."""
        out = []
        for gi, sg in enumerate(saved):
            ng = dict(sg)
            cur = current[gi] if current is not None and gi < len(current) else {}
            for k in ("decay", "initial_lr", "initial_weight_decay", "wd_step"):
                if k not in ng and k in cur:
                    ng[k] = cur[k]
            ng.setdefault("decay", defaults.get("decay", "decoupled"))
            if "initial_lr" not in ng:
                lr = ng["lr"]
                ng["initial_lr"] = lr.clone() if isinstance(lr, Tensor) else lr
            if isinstance(ng.get("betas"), list):
                ng["betas"] = tuple(ng["betas"])
            _validate_hyper(ng, f" ({who} param group {gi})")
            out.append(ng)
        return out

    @staticmethod
    def _steps_as_tensors(state: dict) -> None:
        """A ``step`` that is a Python number (old torch state dicts) or another dtype / device: a 0-d float32
        tensor on its param's device, as every kernel here wants it."""
        for p, st in state.items():
            if not isinstance(p, Tensor) or not isinstance(st, dict) or "step" not in st:
                continue
            step = st["step"]
            if isinstance(step, Tensor):
                if step.dtype != torch.float32 or step.device != p.device:
                    st["step"] = step.to(dtype=torch.float32, device=p.device)
            elif isinstance(step, (int, float)) and not isinstance(step, bool):
                st["step"] = torch.tensor(float(step), dtype=torch.float32, device=p.device)
            else:
                raise ValueError(f"loaded step is {step!r}; expected a number or a 0-d tensor")

    # ---------------------------------------------------------------------------------- copy.deepcopy / pickle
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
                  rule=self.rule, wd_schedule=self._portable_wd_fn(self._wd_default[0]),
                  wd_schedule_steps=self._wd_default[1])
        if self.rule == "adalomo":
            kw.update(adalomo_eps=d["adalomo_eps"], clip_threshold=d["clip_threshold"], decay_rate=d["decay_rate"])
        return kw

    @staticmethod
    def _portable_wd_fn(fn):
        """A named weight-decay schedule (a closure of :func:`zeroadamw.schedules.resolve_wd_schedule`) as an
        equivalent picklable ``functools.partial``; anything else unchanged."""
        from . import schedules

        named = schedules.resolve_wd_schedule("constant", None).__code__
        if callable(fn) and getattr(fn, "__code__", None) is named and fn.__closure__:
            cells = dict(zip(fn.__code__.co_freevars, (c.cell_contents for c in fn.__closure__)))
            if "name" in cells and "steps" in cells:
                import functools

                return functools.partial(schedules.wd_multiplier, cells["name"], total=cells["steps"])
        return fn

    def _holds_gradients(self) -> bool:
        """Between backward and step(): gradients (or a half-finished backward round) live inside the engine."""
        engine = self.engine
        return bool(engine._round_active or any(any(b.present) or b.reduced_grads() for b in engine.buckets))

    def __getstate__(self) -> dict[str, Any]:
        """For ``copy.deepcopy`` and ``pickle``: the constructor arguments, the param groups (their tensors are
        copied with the optimizer, as torch's are) and the consolidated state. The copy rebuilds its own engine,
        buckets and gradient hooks over its params (:meth:`__setstate__`)."""
        what = f"copy.deepcopy / pickle of a {type(self).__name__}"
        if type(self).__init__ is not ShardedAdamW.__init__ and type(self)._copy_kwargs is ShardedAdamW._copy_kwargs:
            raise TypeError(f"{what} is not supported (its constructor is not ShardedAdamW's); build a new optimizer "
                            "over the copied model and opt2.load_state_dict(opt.state_dict()) instead")
        if self.comm.world_size > 1:
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
        groups = []
        for group, fn in zip(self.param_groups, self._wd_fns):
            g = {k: v for k, v in group.items() if k != "process_group"}
            g["wd_schedule"], g["wd_schedule_steps"] = self._portable_wd_fn(fn), None
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
