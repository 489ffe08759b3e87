"""Plain mode: when another system partitions (DeepSpeed ZeRO's client optimizer), act as a plain AdamW.

DeepSpeed ZeRO (and its fp16/bf16 wrappers) hands its client optimizer flat fp32 partitions by replacing the
tensors in ``param_groups``: DeepSpeed shards, so we must not. :meth:`PlainModeMixin._check_plain` detects that
(params the optimizer was not built with) and from then on the optimizer runs :func:`plain_adamw_step` over
whatever ``param_groups`` holds, with torch-style per-param state. :class:`zeroadamw.AdamW` is that step alone.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor

from . import functional as F
from .options import lr_max

__all__ = ["PlainModeMixin", "plain_adamw_step"]


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
                    lr_max=lr_max(group), impl=impl)


class PlainModeMixin:
    def _check_plain(self) -> bool:
        """DeepSpeed ZeRO (and its fp16/bf16 wrappers) hand their client optimizer flat fp32 partitions by
        replacing the tensors in ``param_groups``: DeepSpeed shards, so we must not. Detect that (params we were
        not built with) and act, from then on, as a plain AdamW over whatever ``param_groups`` holds."""
        if self._plain:
            return True
        if all(p in self._seen for g in self.param_groups for p in g["params"]):
            return False
        if not self._rule.plain_client:
            raise ValueError(
                f"rule={self.rule!r} cannot run as another system's client optimizer (DeepSpeed partitions the "
                "state and hands over flat partitions); use rule='adamw' there")
        self._plain = True
        self.engine.remove_hooks()
        self.engine.clear()
        self.state.clear()  # nothing of ours refers to the new tensors; torch-style per-param state from here on
        self.engine.gathers.wait_all()
        for b in self.engine.buckets:
            b.exp_avg = b.exp_avg_sq = b.master = None
            b.flat, b._bound = None, []  # DeepSpeed points p.data at its own buffers: ours would be a full copy
        self.engine.pool.clear()
        self._state_ready = False
        logging.getLogger("zeroadamw").info(
            "ShardedAdamW: param_groups were replaced (DeepSpeed ZeRO partitions itself); acting as a plain AdamW")
        return True

    def _plain_step(self) -> None:
        plain_adamw_step(self.param_groups, self.state, self.impl, "ShardedAdamW as DeepSpeed's client optimizer")
