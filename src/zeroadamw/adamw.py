"""AdamW: the plain (non-sharding) optimizer of the family -- torch.optim.AdamW's behaviour with the three decay
modes, for places where something else already partitions the state (DeepSpeed ZeRO hands its client optimizer
flat fp32 partitions and replaces ``param_groups`` with them) or where you want no distributed machinery at all.

It reads ``param_groups`` at every step (so whoever swaps the parameters in them is followed), keeps ``step``,
``exp_avg``, ``exp_avg_sq`` per parameter exactly as ``torch.optim.AdamW`` does (its state dicts load in both),
and runs the same kernels as ShardedAdamW (:mod:`zeroadamw.functional`).
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
from torch import Tensor

from . import functional as F
from .schedules import WdScheduleMixin
from .sharded_adamw import _validate_hyper, plain_adamw_step

__all__ = ["AdamW"]


class AdamW(WdScheduleMixin, torch.optim.Optimizer):
    """Plain AdamW with ``decay`` in {"decoupled", "independent", "l2"} (see :class:`zeroadamw.ShardedAdamW`), with the same
    optional ``wd_schedule`` / ``wd_schedule_steps``."""

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        decay: str = "decoupled",
        impl: str = "auto",
        wd_schedule=None,
        wd_schedule_steps: int | None = None,
    ) -> None:
        self._wd_default = (wd_schedule, wd_schedule_steps)
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, decay=decay)
        _validate_hyper(defaults)
        if impl not in ("auto", *F.KERNELS):
            raise ValueError(f"Unknown impl {impl!r}; expected 'auto' or one of {sorted(F.KERNELS)}")
        self.impl = impl
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        param_group = dict(param_group)
        wd_fn = self._wd_take(param_group, *self._wd_default)
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        if isinstance(group["betas"], list):
            group["betas"] = tuple(group["betas"])
        _validate_hyper(group, f" (param group {len(self.param_groups) - 1})")
        group.setdefault("initial_lr", group["lr"])
        self._wd_register(group, wd_fn)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._record_step_hparams()
        plain_adamw_step(self.param_groups, self.state, self.impl, "zeroadamw.AdamW")
        self._advance_wd_schedule()
        return loss
