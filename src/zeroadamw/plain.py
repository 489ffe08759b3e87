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
from . import quant, storage
from .options import lr_max

__all__ = ["PlainModeMixin", "plain_adamw_step", "init_plain_state", "plain_state_template"]


def init_plain_state(p: Tensor, st: dict, state_dtype: str | None, kahan: bool) -> None:
    """Fresh torch-style state of ``p`` in the storage asked for (:mod:`zeroadamw.storage`): float moments
    shaped like ``p``, or uint8 codes shaped like ``p`` with per-block scales; a Kahan compensation for bf16/fp16
    params with ``kahan``."""
    st["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
    for k, t in plain_state_template(p, state_dtype, kahan).items():
        if t.dtype == torch.uint8:
            st[k] = torch.full(p.shape, quant.zero_code(k == "exp_avg"), dtype=torch.uint8, device=p.device)
        elif k.endswith("_absmax"):
            st[k] = torch.zeros(quant.nblocks(p.numel()), dtype=torch.float32, device=p.device)
        else:
            st[k] = torch.zeros_like(p, dtype=t.dtype, memory_format=torch.preserve_format)


def plain_state_template(p: Tensor, state_dtype: str | None, kahan: bool) -> dict[str, Tensor]:
    """Empty tensors of the dtype of every state kind ``p`` gets (what :func:`storage.convert_entry` reads)."""
    if p.is_complex():
        state_dtype, kahan = None, False  # complex params: torch's storage (moments in the param dtype)
    elif state_dtype == "int8" and p.numel() < quant.MIN_QUANTIZED_NUMEL:
        state_dtype = "fp32"
    kahan = kahan and p.dtype in (torch.float16, torch.bfloat16)
    md = storage.moment_dtype(state_dtype, p.dtype, None, kahan)
    e = lambda dt: torch.empty(0, dtype=dt)  # noqa: E731
    if md == "int8":
        out = {"exp_avg": e(torch.uint8), "exp_avg_sq": e(torch.uint8), "exp_avg_absmax": e(torch.float32),
               "exp_avg_sq_absmax": e(torch.float32)}
    else:
        out = {"exp_avg": e(md), "exp_avg_sq": e(md)}
    if kahan:
        out["kahan_comp"] = e(p.dtype)
    return out


def _working(p: Tensor, st: dict) -> tuple[tuple[Tensor, ...], bool]:
    """(param, grad, exp_avg, exp_avg_sq) for the kernel, and whether they are working copies to store back."""
    m, v = st["exp_avg"], st["exp_avg_sq"]
    if m.dtype == p.dtype and "kahan_comp" not in st:
        return (p, p.grad, m, v), False
    cd = torch.float64 if p.dtype == torch.float64 else torch.float32
    t = p.detach().to(cd)
    if "kahan_comp" in st:
        t.add_(st["kahan_comp"])
    if m.dtype == torch.uint8:
        m = quant.dequantize_tensor(m, st["exp_avg_absmax"], True)
        v = quant.dequantize_tensor(v, st["exp_avg_sq_absmax"], False)
        quant.guard_underflow(m, v)
    return (t, p.grad.to(cd), m.to(cd), v.to(cd)), True


def _store(p: Tensor, st: dict, work: tuple[Tensor, ...]) -> None:
    t, _, m, v = work
    if "kahan_comp" in st:
        new = t.to(p.dtype)
        st["kahan_comp"].copy_(t.sub_(new.to(t.dtype)))
        p.detach().copy_(new)
    elif t is not p:
        p.detach().copy_(t)
    if st["exp_avg"].dtype == torch.uint8:
        st["exp_avg"], st["exp_avg_absmax"] = quant.quantize_tensor(m, True)
        st["exp_avg_sq"], st["exp_avg_sq_absmax"] = quant.quantize_tensor(v, False)
    elif m is not st["exp_avg"]:
        st["exp_avg"].copy_(m)
        st["exp_avg_sq"].copy_(v)


def plain_adamw_step(param_groups: list[dict], state, impl: str, who: str, state_dtype: str | None = None,
                     kahan: bool = False) -> None:
    """One unsharded AdamW step over ``param_groups`` with torch-style per-param ``state`` (lazily created): what
    :class:`zeroadamw.AdamW` does, and ShardedAdamW when another system partitions (DeepSpeed's client).

    As in ``torch.optim``: complex params are updated as real views (param, grad and moments through
    ``torch.view_as_real``; the state stays complex), and a ``step`` that is not a 0-d float32 tensor on the param's
    device (a Python float from an old state dict) is converted first. Params, grads and moments of any strides
    are fine: :func:`zeroadamw.functional.adamw` sends mismatched layouts past the fused kernel. ``state_dtype`` /
    ``kahan``: moments stored in bf16 or int8, Kahan-compensated low-precision weights; the math then runs on fp32
    working copies, written back after (:mod:`zeroadamw.storage`)."""
    for group in param_groups:
        by_kind: dict[tuple, tuple[list, ...]] = {}
        copies = []
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise TypeError(f"{who} does not take sparse gradients (use SparseAdamW for nn.Embedding(sparse=True))")
            st = state[p]
            if not st:
                init_plain_state(p, st, state_dtype, kahan)
            step = st["step"]
            if not isinstance(step, Tensor) or step.dtype != torch.float32 or step.device != p.device:
                st["step"] = torch.as_tensor(float(step), dtype=torch.float32).to(p.device)
            tensors, copied = _working(p, st)
            if copied:
                copies.append((p, st, tensors))
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
        for p, st, tensors in copies:
            _store(p, st, tensors)


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
        plain_adamw_step(self.param_groups, self.state, self.impl, "ShardedAdamW as DeepSpeed's client optimizer",
                         self.state_dtype, self.kahan_sum)
