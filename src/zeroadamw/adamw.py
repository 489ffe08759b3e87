"""AdamW: the plain (non-sharding) optimizer of the family -- torch.optim.AdamW's behaviour with the three decay
modes, for places where something else already partitions the state (DeepSpeed ZeRO hands its client optimizer
flat fp32 partitions and replaces ``param_groups`` with them) or where you want no distributed machinery at all.

It reads ``param_groups`` at every step (so whoever swaps the parameters in them is followed), keeps ``step``,
``exp_avg``, ``exp_avg_sq`` per parameter exactly as ``torch.optim.AdamW`` does (its state dicts load in both:
keys torch's groups lack -- ``decay``, ``initial_lr``, the weight-decay schedule's -- keep this optimizer's
values, and a float ``step`` from an old torch state dict becomes a tensor), and runs the same kernels as
ShardedAdamW (:mod:`zeroadamw.functional`). As in torch: complex params are updated through real views (state
stays complex), ``copy.deepcopy`` / ``pickle`` copy the optimizer with its params, and every torch.optim hook
(step, state_dict, load_state_dict) runs.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
from torch import Tensor

from .consolidation import complete_loaded_state
from .options import check_impl, validate_hyper, validate_precision
from .plain import plain_adamw_step, plain_load_state_dict, state_bytes
from .schedules import WdScheduleMixin, portable_wd_fn

__all__ = ["AdamW"]


class AdamW(WdScheduleMixin, torch.optim.Optimizer):
    """Plain AdamW with ``decay`` in {"decoupled", "independent", "l2"} (see :class:`zeroadamw.ShardedAdamW`), with the same
    optional ``wd_schedule`` / ``wd_schedule_steps``, ``state_dtype`` (``"fp32"`` / ``"bf16"`` / ``"int8"``
    moments; ``None``: the param's dtype, as torch) and ``kahan_sum`` (bf16/fp16 params: a compensation buffer,
    see :mod:`zeroadamw.storage`)."""

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
        state_dtype: str | None = None,
        kahan_sum: bool = False,
    ) -> None:
        self._wd_default = (wd_schedule, wd_schedule_steps)
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, decay=decay)
        validate_hyper(defaults)
        check_impl(impl)
        validate_precision(state_dtype, kahan_sum, None)
        self.impl = impl
        self.state_dtype, self.kahan_sum = state_dtype, kahan_sum
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        param_group = dict(param_group)
        wd_fn = self._wd_take(param_group, *self._wd_default)
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        if isinstance(group["betas"], list):
            group["betas"] = tuple(group["betas"])
        validate_hyper(group, f" (param group {len(self.param_groups) - 1})")
        lr0 = group["lr"]  # a tensor lr is written in place by LR schedulers: the peak must not follow it
        group.setdefault("initial_lr", lr0.clone() if isinstance(lr0, Tensor) else lr0)
        self._wd_register(group, wd_fn)

    # ------------------------------------------------------------------------- loading, deepcopy and pickle
    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()  # defaults, state, param_groups: what torch.optim copies
        state["impl"] = self.impl
        state["state_dtype"], state["kahan_sum"] = self.state_dtype, self.kahan_sum
        state["_wd_default"] = (portable_wd_fn(self._wd_default[0]), self._wd_default[1])
        state["_wd_fns"] = [portable_wd_fn(fn) for fn in getattr(self, "_wd_fns", [])]
        if "last_step_hparams" in self.__dict__:
            state["last_step_hparams"] = self.last_step_hparams
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Unpickling / deepcopy, and the last stage of ``load_state_dict`` (torch's, which installs the loaded
        groups and state through here): torch's groups get the zeroadamw keys they lack and are validated, and
        float steps become tensors, before anything is changed."""
        super().__setstate__(complete_loaded_state(self, state))
        self.__dict__.setdefault("impl", "auto")
        self.__dict__.setdefault("state_dtype", None)
        self.__dict__.setdefault("kahan_sum", False)
        self.__dict__.setdefault("_wd_default", (None, None))
        if len(self.__dict__.setdefault("_wd_fns", [])) != len(self.param_groups):
            self._wd_fns = [None] * len(self.param_groups)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's ``load_state_dict`` (hooks, validation, param-group keys), then every loaded tensor in the
        storage this optimizer keeps (:func:`zeroadamw.plain.plain_load_state_dict`: torch's cast to the param
        dtype would turn int8 codes into floats and round fp32 moments of bf16 params)."""
        plain_load_state_dict(self, state_dict, self.state_dtype, self.kahan_sum)

    def state_bytes(self) -> int:
        """Bytes of optimizer state held: moments (int8 codes and scales), Kahan compensation; not ``step``."""
        return state_bytes(self.state)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._record_step_hparams()
        plain_adamw_step(self.param_groups, self.state, self.impl, "zeroadamw.AdamW", self.state_dtype, self.kahan_sum)
        self._advance_wd_schedule()
        return loss
