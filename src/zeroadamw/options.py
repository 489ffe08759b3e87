"""Options: every check of what a user hands ShardedAdamW / SparseAdamW / AdamW, before anything is built.

Hyperparameters (per param group: ``lr``, ``betas``, ``eps``, ``weight_decay``, ``decay``), the constructor's
options (stage, bucket size, dtypes, kernels, step in backward), the params themselves, and the param groups of a
loaded state dict (torch's groups lack zeroadamw's keys: :func:`completed_groups` fills them in). Errors are
``ValueError`` / ``TypeError`` naming the fix; nothing here changes an optimizer. (SparseAdamW's own group keys,
``sparse`` and ``process_group``, are checked in its ``add_param_group``; rules check their hyperparameters in
:meth:`zeroadamw.rules.Rule.check_hyper`.)
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from . import functional as F

__all__ = ["DEFAULT_BUCKET_SIZE", "lr_max", "validate_hyper", "validate_options", "validate_max_grad_norm",
           "check_impl", "check_params", "completed_groups", "steps_as_tensors"]

DEFAULT_BUCKET_SIZE = 2**23  # the largest bucket the default (bucket_size=None) picks
MIN_AUTO_BUCKET_SIZE = 2**20
AUTO_BUCKETS = 32  # bucket_size=None: about this many buckets per model (within the two bounds)


def auto_bucket_size(trainable_numel: int) -> int:
    """The default bucket size for ``trainable_numel`` trainable elements: about 1/32 of them, between 2**20 and
    :data:`DEFAULT_BUCKET_SIZE` (2**23). The buckets in flight during backward (about four) then hold about 1/8
    of the gradients of a small model instead of most of them, and large models get DDP-sized buckets."""
    return min(DEFAULT_BUCKET_SIZE, max(MIN_AUTO_BUCKET_SIZE, trainable_numel // AUTO_BUCKETS))


def materialise_params(params: Any) -> Any:
    """``params`` as a list (and each group's ``params`` too), so it can be counted before torch reads it. A
    tensor is returned as it is (torch.optim.Optimizer raises its own TypeError for it)."""
    if isinstance(params, torch.Tensor):
        return params
    out = []
    for item in params:
        if isinstance(item, dict) and not isinstance(item.get("params"), (torch.Tensor, set, type(None))):
            item = dict(item, params=list(item["params"]))
        out.append(item)
    return out


def trainable_numel(params: Any) -> int:
    """Trainable elements in a list of tensors or param-group dicts (materialised lists)."""
    total = 0
    for item in [] if isinstance(params, torch.Tensor) else params:
        ts = item.get("params", []) if isinstance(item, dict) else [item]
        ts = [ts] if isinstance(ts, torch.Tensor) else ts
        total += sum(t.numel() for t in ts if isinstance(t, torch.Tensor) and t.requires_grad)
    return total
"""Elements per communication bucket: 8.4M (16 MiB of bf16 gradients, 32 MiB of fp32). Large enough for
collectives to reach full bandwidth (DDP's default is 25 MB), small enough that several buckets overlap with
backward and that the transient full-size buffers (at most three buckets) stay small. Raise it for very large
models on fast interconnects (Megatron uses 40M), lower it for small models to get any overlap at all."""

HYPER = ("lr", "betas", "eps", "weight_decay", "decay")
_UNSUPPORTED = {"amsgrad": False, "maximize": False, "capturable": False, "differentiable": False}


def lr_max(group: dict) -> float:
    """The peak lr ``decay="independent"`` divides by: OneCycleLR's ``max_lr`` when present (its ``initial_lr`` is
    the starting lr, max_lr / div_factor), else ``initial_lr`` (set by LR schedulers and at construction)."""
    v = group.get("max_lr", group.get("initial_lr", group["lr"]))
    return float(v.item() if isinstance(v, Tensor) else v)


def _check_float(name: str, v: Any, where: str) -> None:
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        raise TypeError(f"{name} must be a float{where}, got {type(v).__name__}")


def validate_hyper(group: dict, where: str = "") -> None:
    """Check a param group's (or the defaults') hyperparameters; ``where`` names the group in messages."""
    lr, betas, eps, wd, decay = (group[k] for k in HYPER)
    if isinstance(lr, Tensor):
        if lr.numel() != 1:
            raise ValueError(f"Tensor lr must be 1-element{where}")
        lr = lr.item()
    _check_float("lr", lr, where)
    if not 0.0 <= lr:
        raise ValueError(f"Invalid learning rate: {lr}{where}")
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"betas must be a pair (beta1, beta2){where}, got {betas!r}")
    for i, b in enumerate(betas):
        _check_float(f"beta parameter at index {i}", b, where)
        if not 0.0 <= b < 1.0:
            raise ValueError(f"Invalid beta parameter at index {i}: {b}{where}")
    _check_float("eps", eps, where)
    if not 0.0 <= eps:
        raise ValueError(f"Invalid epsilon value: {eps}{where}")
    _check_float("weight_decay", wd, where)
    if not 0.0 <= wd:
        raise ValueError(f"Invalid weight_decay value: {wd}{where}")
    if decay not in F.DECAY_MODES:
        raise ValueError(f"Unknown decay mode {decay!r}{where}; expected one of {', '.join(F.DECAY_MODES)}")
    if decay == "independent":
        lr0 = lr_max(group)
        if wd and not lr0 > 0:
            raise ValueError(f"decay='independent' divides by the group's initial lr, which is {lr0}{where}")
    for key, ok in _UNSUPPORTED.items():
        if group.get(key, ok) != ok:
            raise ValueError(f"ShardedAdamW does not implement {key}={group[key]!r}{where}; remove it from the group")


def _check_dtype(name: str, dtype: Any) -> None:
    if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
        raise TypeError(f"{name} must be a floating torch.dtype or None, got {dtype!r}")


def validate_options(*, stage: Any, bucket_size: Any, master_dtype: Any, reduce_dtype: Any, grads_reduced: bool,
                     impl: str, step_in_backward: bool, param_views: Any = True,
                     overlap_param_gather: Any = False, state_dtype: Any = None, kahan_sum: Any = False,
                     rule: str = "adamw") -> None:
    """The constructor's non-hyperparameter options of ShardedAdamW, and how they combine."""
    validate_precision(state_dtype, kahan_sum, master_dtype, rule)
    if stage not in (1, 2) or isinstance(stage, bool):
        raise ValueError(f"stage must be 1 (shard optimizer state) or 2 (also shard gradients), got {stage!r}")
    if bucket_size is not None and (not isinstance(bucket_size, int) or isinstance(bucket_size, bool)
                                    or bucket_size < 1):
        raise ValueError(f"bucket_size must be a positive int (elements per bucket) or None (automatic), got "
                         f"{bucket_size!r}")
    _check_dtype("master_dtype", master_dtype)
    _check_dtype("reduce_dtype", reduce_dtype)
    if grads_reduced and stage != 1:
        raise ValueError(
            "grads_reduced=True (gradients already averaged by DDP) needs stage=1: stage 2 reduce-scatters "
            "gradients itself during backward, so don't wrap the model in DDP with stage=2"
        )
    check_impl(impl)
    if step_in_backward and stage != 2:
        raise ValueError("step_in_backward reduces (and updates) during backward, which is stage 2; use stage=2")
    if step_in_backward and grads_reduced:
        raise ValueError(
            "step_in_backward reduces gradients itself in backward hooks; don't wrap the model in DDP "
            "(grads_reduced=True is for DDP + stage 1)")
    for name, v in (("param_views", param_views), ("overlap_param_gather", overlap_param_gather)):
        if not isinstance(v, bool):
            raise TypeError(f"{name} must be True or False, got {v!r}")
    if overlap_param_gather and not param_views:
        raise ValueError("overlap_param_gather=True needs param_views=True (the all-gather lands in the params "
                         "themselves; without views it would hold a full-size output buffer until the forward)")


def validate_precision(state_dtype: Any, kahan_sum: Any, master_dtype: Any, rule: str = "adamw") -> None:
    """``state_dtype`` / ``kahan_sum`` (:mod:`zeroadamw.storage`) and how they combine with the rest."""
    from .storage import STATE_DTYPES

    if state_dtype is not None and state_dtype not in STATE_DTYPES:
        hint = " (a string, not a torch.dtype)" if isinstance(state_dtype, torch.dtype) else ""
        raise ValueError(f"state_dtype must be one of {STATE_DTYPES} or None (automatic), got {state_dtype!r}{hint}")
    if not isinstance(kahan_sum, bool):
        raise TypeError(f"kahan_sum must be True or False, got {kahan_sum!r}")
    if kahan_sum and master_dtype is not None:
        raise ValueError("kahan_sum=True replaces the fp32 master of bf16/fp16 params by a compensation buffer; "
                         "pass master_dtype=None with it")
    if state_dtype not in (None, "fp32") and rule != "adamw":
        raise ValueError(f"state_dtype={state_dtype!r} stores Adam moments; rule={rule!r} keeps none of that kind "
                         "(use rule='adamw', or leave state_dtype unset)")
    if kahan_sum and rule == "adalomo":
        raise ValueError("kahan_sum=True is implemented for the element-wise rules ('adamw', 'lomo'), not 'adalomo'")


def check_impl(impl: Any) -> None:
    if impl not in ("auto", *F.KERNELS):
        raise ValueError(f"Unknown impl {impl!r}; expected 'auto' or one of {sorted(F.KERNELS)}")


def validate_max_grad_norm(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"max_grad_norm must be a float or None, got {type(value).__name__}")
    if not value > 0:
        raise ValueError(f"max_grad_norm must be > 0 (or None for no clipping), got {value}")
    return float(value)


def check_params(params: Any, seen: set, device: torch.device | None) -> tuple[list[Tensor], torch.device | None]:
    """A new param group's ``params`` as a list, checked (tensors, each listed once, real floating point,
    contiguous when trainable, leaves, one device); returns them and the device they share."""
    if isinstance(params, Tensor):
        params = [params]
    elif isinstance(params, set):
        raise TypeError("optimizer parameters need to be organized in ordered collections, not sets")
    params = list(params)
    ids = set()
    for p in params:
        if not isinstance(p, Tensor):
            raise TypeError(f"optimizer can only optimize Tensors, but one of the params is {type(p).__name__}")
        if p in ids or p in seen:
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
        if device is None:
            device = p.device
        elif p.device != device:
            raise ValueError(
                f"all parameters must be on one device, got {device} and {p.device}; "
                "move the model to its device before building the optimizer"
            )
    return params, device


def completed_groups(saved: list[dict], current: list[dict] | None, defaults: dict, who: str) -> list[dict]:
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
        validate_hyper(ng, f" ({who} param group {gi})")
        out.append(ng)
    return out


def steps_as_tensors(state: dict) -> None:
    """A ``step`` that is a Python number (old torch state dicts) or another dtype / device: a 0-d float32 tensor
    on its param's device, as every kernel here wants it."""
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


def check_fsdp_options(params: Any, *, process_group, device_mesh, step_in_backward: bool, rule) -> bool:
    """Whether the params are FSDP2's DTensor shards (then ShardedAdamW runs as a plain AdamW on the local shards:
    FSDP2 already shards, and a second sharding would split the shards again); options that cannot apply there
    are refused with the fix."""
    from .plain import is_dtensor

    items = [params] if isinstance(params, torch.Tensor) else params
    tensors = [p for item in items for p in (item["params"] if isinstance(item, dict) else [item])]
    flags = [is_dtensor(p) for p in tensors if isinstance(p, torch.Tensor)]
    if not any(flags):
        return False
    if not all(flags):
        raise ValueError("some parameters are DTensors (FSDP2's fully_shard) and some are not: shard the whole model "
                         "with fully_shard (its root too) before building the optimizer")
    if process_group is not None or device_mesh is not None:
        raise ValueError("the parameters are FSDP2 DTensor shards: FSDP2 already shards (and reduces) them over its "
                         "mesh, so the optimizer runs as a plain AdamW on the local shards -- drop process_group= / "
                         "device_mesh= (the mesh is the one given to fully_shard)")
    if step_in_backward:
        raise ValueError("step_in_backward is not supported on FSDP2 parameters (FSDP2 reduce-scatters the gradients "
                         "itself after backward); use step_in_backward=False")
    if not rule.plain_client:
        raise ValueError(f"rule={rule.name!r} cannot run on FSDP2's shards ; use rule='adamw' "
                         "(or zeroadamw.AdamW)")
    return True

