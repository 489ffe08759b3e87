"""Plain mode: when another system partitions (DeepSpeed ZeRO's client optimizer), act as a plain AdamW.

DeepSpeed ZeRO (and its fp16/bf16 wrappers) hands its client optimizer flat fp32 partitions by replacing the
tensors in ``param_groups``: DeepSpeed shards, so we must not. :meth:`PlainModeMixin._check_plain` detects that
(params the optimizer was not built with) and from then on the optimizer runs :func:`plain_adamw_step` over
whatever ``param_groups`` holds, with torch-style per-param state. :class:`zeroadamw.AdamW` is that step alone.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from torch import Tensor

from . import functional as F
from . import quant, storage
from .options import lr_max

__all__ = ["PlainModeMixin", "plain_adamw_step", "plain_load_state_dict", "init_plain_state", "plain_state_template",
           "is_dtensor", "local", "state_bytes"]


# ------------------------------------------------------------------------------------------ FSDP2's DTensors
def is_dtensor(t) -> bool:
    """Whether ``t`` is a ``torch.distributed.tensor.DTensor`` (FSDP2's sharded params and their gradients)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        return False
    return isinstance(t, DTensor)


def local(t: Tensor) -> Tensor:
    """The local shard of a DTensor (a view: writing it writes the DTensor), else ``t`` itself. FSDP2 already
    shards, so the plain step runs on these: no collective, no second sharding, no DTensor dispatch per op."""
    return t._local_tensor if is_dtensor(t) else t


def _like_param(p: Tensor, t: Tensor) -> Tensor:
    """State ``t`` made for ``local(p)``, as a DTensor of ``p``'s mesh and placements when ``p`` is one: the state
    torch.optim.AdamW would hold under FSDP2, so torch's distributed-checkpoint helpers reshard it."""
    if not is_dtensor(p) or t.shape != local(p).shape:
        return t  # the step, int8 scales (per block of the local shard): plain local tensors
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(t, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride())


def state_bytes(state) -> int:
    """Bytes of optimizer state this rank holds (local shards of DTensors): moments (int8 codes and scales),
    Kahan compensation; not ``step``."""
    return sum(local(t).numel() * t.element_size() for st in state.values() for k, t in st.items()
               if isinstance(t, Tensor) and k != "step")


def init_plain_state(p: Tensor, st: dict, state_dtype: str | None, kahan: bool) -> None:
    """Fresh torch-style state of ``p`` in the storage asked for (:mod:`zeroadamw.storage`): float moments
    shaped like ``p``, or uint8 codes shaped like ``p`` with per-block scales; a Kahan compensation for bf16/fp16
    params with ``kahan``."""
    st["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
    lp = local(p)
    for k, t in plain_state_template(lp, state_dtype, kahan).items():
        if t.dtype == torch.uint8:
            x = torch.full(lp.shape, quant.zero_code(k == "exp_avg"), dtype=torch.uint8, device=lp.device)
        elif k.endswith("_absmax"):
            x = torch.zeros(quant.nblocks(lp.numel()), dtype=torch.float32, device=lp.device)
        else:
            x = torch.zeros_like(lp, dtype=t.dtype, memory_format=torch.preserve_format)
        st[k] = _like_param(p, x)


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


def plain_load_state_dict(opt: torch.optim.Optimizer, state_dict: dict, state_dtype: str | None,
                          kahan: bool) -> None:
    """``torch.optim.Optimizer.load_state_dict`` (its hooks, validation, param-group keys), then every loaded
    tensor in the storage this optimizer keeps: torch casts state to the param dtype, which would turn int8 codes
    into floats and round fp32 moments and int8 scales of bf16 params -- those are re-read from the state dict
    (as the pre-hooks left it) and converted instead (:func:`zeroadamw.storage.convert_entry`). Used by
    :class:`zeroadamw.AdamW` and by ShardedAdamW as DeepSpeed's client."""
    seen: dict[str, Any] = {}

    def capture(_opt, sd):  # runs after every other pre-hook: the state dict torch will load
        seen["sd"] = sd

    handle = opt.register_load_state_dict_pre_hook(capture)
    try:
        torch.optim.Optimizer.load_state_dict(opt, state_dict)
    finally:
        handle.remove()
    sd = seen.get("sd", state_dict)
    saved = sd.get("state", {})
    ids = [i for g in sd["param_groups"] for i in g["params"]]
    params = [p for g in opt.param_groups for p in g["params"]]
    for pid, p in zip(ids, params):
        if pid not in saved or not opt.state.get(p):
            continue
        mine = plain_state_template(p, state_dtype, kahan)
        st = storage.convert_entry(p, saved[pid], mine, f"param index {pid}")
        step = opt.state[p]["step"]  # (torch may hand back the saved step tensor itself: a copy, not a share)
        new = {"step": step.clone() if isinstance(step, Tensor) else step}
        for k, t in mine.items():
            if not isinstance(st.get(k), Tensor):
                raise ValueError(f"param index {pid}: loaded state lacks {k!r}")
            want = (quant.nblocks(p.numel()),) if k.endswith("_absmax") else tuple(p.shape)
            if tuple(st[k].shape) != want:
                raise ValueError(f"param index {pid}: loaded {k} has shape {tuple(st[k].shape)}, expected {want}; "
                                 "the state dict belongs to a different model")
            new[k] = st[k].detach().to(device=p.device, dtype=t.dtype).clone()
        opt.state[p] = new


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
        beta1, beta2 = group["betas"]
        hyper = dict(lr=float(group["lr"]), beta1=beta1, beta2=beta2, eps=group["eps"],
                     weight_decay=group["weight_decay"], decay=group["decay"], lr_max=lr_max(group), impl=impl)
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
            grad = local(p.grad)
            if is_dtensor(p):  # FSDP2: the local shards (state made for them; writes go through the views)
                st = {k: local(v) for k, v in st.items()}
                p = local(p)
            if st["exp_avg"].dtype != p.dtype or "kahan_comp" in st:  # stored otherwise: chunk by chunk
                _precision_update(p, st, hyper, grad)
                continue
            tensors = (p, grad, st["exp_avg"], st["exp_avg_sq"])
            if p.is_complex():
                tensors = tuple(torch.view_as_real(t) for t in tensors)
            lists = by_kind.setdefault((p.device, tensors[0].dtype), ([], [], [], [], []))
            for lst, t in zip(lists, (*tensors, st["step"])):
                lst.append(t)
        for params, grads, m, v, steps in by_kind.values():
            F.adamw(params, grads, m, v, steps, **hyper)


_CHUNK = 1 << 22  # elements per working copy (a multiple of the 256-element block): DeepSpeed's flat partitions


def _precision_update(p: Tensor, st: dict, hyper: dict, grad: Tensor) -> None:
    """One param whose state is stored in another dtype (bf16 / int8 moments, Kahan): fp32 working copies of at
    most ``_CHUNK`` elements at a time (a flat partition of hundreds of millions of elements must not get fp32
    copies of everything at once), the kernel, the stored values written back in place."""
    n = p.numel()
    step = st["step"]
    taken = step.clone()
    for lo in range(0, n, _CHUNK):
        hi = min(n, lo + _CHUNK)
        s = step.clone()  # every chunk takes the same step; the count is advanced once
        work = _working(p, st, lo, hi, grad)
        F.adamw([work[0]], [work[1]], [work[2]], [work[3]], [s], **hyper)
        _store(p, st, work, lo, hi, s)
        taken = s
    step.copy_(taken)


def _working(p: Tensor, st: dict, lo: int, hi: int, grad: Tensor) -> tuple[Tensor, ...]:
    """fp32 (param, grad, exp_avg, exp_avg_sq) of the flat elements ``lo:hi`` of ``p``."""
    cd = torch.float64 if p.dtype == torch.float64 else torch.float32
    t = p.detach().reshape(-1)[lo:hi].to(cd, copy=True)
    if "kahan_comp" in st:
        t.add_(st["kahan_comp"].reshape(-1)[lo:hi])
    m, v = st["exp_avg"].reshape(-1)[lo:hi], st["exp_avg_sq"].reshape(-1)[lo:hi]
    if m.dtype == torch.uint8:
        b0 = lo // quant.BLOCK
        b1 = b0 + quant.nblocks(hi - lo)
        m = quant.dequantize_tensor(m, st["exp_avg_absmax"][b0:b1], True)
        v = quant.dequantize_tensor(v, st["exp_avg_sq_absmax"][b0:b1], False)
        quant.guard_underflow(m, v)
    return t, grad.reshape(-1)[lo:hi].to(cd), m.to(cd), v.to(cd)


def _store(p: Tensor, st: dict, work: tuple[Tensor, ...], lo: int, hi: int, step: Tensor) -> None:
    t, _, m, v = work
    flat = p.detach().reshape(-1)[lo:hi]
    if "kahan_comp" in st:
        new = t.to(p.dtype)
        st["kahan_comp"].reshape(-1)[lo:hi].copy_(t.sub_(new.to(t.dtype)))
        flat.copy_(new)
    else:
        flat.copy_(t)
    if st["exp_avg"].dtype == torch.uint8:
        b0 = lo // quant.BLOCK
        b1 = b0 + quant.nblocks(hi - lo)
        for k, x, signed in (("exp_avg", m, True), ("exp_avg_sq", v, False)):
            codes, absmax = quant.quantize_tensor(x.float(), signed)
            st[k].reshape(-1)[lo:hi].copy_(codes)
            st[k + "_absmax"][b0:b1].copy_(absmax)
    else:
        if st["exp_avg"].dtype == torch.bfloat16 and m.dtype == torch.float32:  # stochastic rounding (storage.py)
            v = quant.stochastic_bf16(v, torch.arange(lo, hi, dtype=torch.int32, device=m.device), step, 2)
        st["exp_avg"].reshape(-1)[lo:hi].copy_(m)
        st["exp_avg_sq"].reshape(-1)[lo:hi].copy_(v)


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
        # Accelerate's FSDP2 prepare() swaps the params for fully_shard's DTensors: FSDP2 mode from here on
        self._fsdp = all(is_dtensor(p) for g in self.param_groups for p in g["params"])
        self.engine.remove_hooks()
        self.engine.clear()
        self.state.clear()  # nothing of ours refers to the new tensors; torch-style per-param state from here on
        self.engine.gathers.wait_all()
        for b in self.engine.buckets:
            for name in b.STATE_NAMES:
                setattr(b, name, None)
            b.flat, b._bound = None, []  # DeepSpeed points p.data at its own buffers: ours would be a full copy
        self.engine.pool.clear()
        self._state_ready = False
        logging.getLogger("zeroadamw").info(
            "ShardedAdamW: param_groups were replaced (%s); acting as a plain AdamW",
            "by FSDP2's DTensor shards" if self._fsdp else "DeepSpeed ZeRO partitions itself")
        return True

    def _plain_load_state_dict(self, state_dict: dict) -> None:
        plain_load_state_dict(self, state_dict, self.state_dtype, self.kahan_sum)

    def _plain_step(self) -> None:
        who = "ShardedAdamW on FSDP2's shards" if self._fsdp else "ShardedAdamW as DeepSpeed's client optimizer"
        plain_adamw_step(self.param_groups, self.state, self.impl, who, self.state_dtype, self.kahan_sum)

    def _fsdp_agree(self, grad_scaler) -> bool:
        """FSDP2 (DTensor params): the gradient norm of each param group over every rank's shards (torch's
        ``get_total_norm`` on the DTensor gradients: one small collective per group, one host read), clipping by
        ``max_grad_norm`` on the local shards, and the skip of a non-finite step -- the same on every rank, since
        the norms are. Returns whether to take the step."""
        if grad_scaler is not None and grad_scaler.is_enabled():
            raise TypeError("ShardedAdamW on FSDP2 params does not take a GradScaler (the inf check would be per "
                            "rank); train in bf16 (no loss scaling needed) or use zeroadamw.AdamW with "
                            "torch.amp.GradScaler")
        grads = [[p.grad for p in g["params"] if p.grad is not None] for g in self.param_groups]
        every = [t for gs in grads for t in gs]
        # the total as torch.nn.utils.clip_grad_norm_ computes it (so clipping matches it bit for bit), and each
        # group's for the statistics: collectives over FSDP2's mesh (DTensor results), one host read
        norms = [torch.nn.utils.get_total_norm(gs, 2.0) if gs else torch.zeros(()) for gs in (every, *grads)]
        full = [n.full_tensor() if is_dtensor(n) else n for n in norms]
        host = torch.stack([n.to(torch.float64).cpu() for n in full]).tolist()  # the host read of the step
        total = host[0]
        self.group_grad_norms, self.grad_norm = host[1:], total
        self.grad_norm_tensor.fill_(total)
        self.last_step_skipped = not math.isfinite(total)
        if self.last_step_skipped:
            self.skipped_steps += 1
            return False
        if self.max_grad_norm is not None:
            params = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
            torch.nn.utils.clip_grads_with_norm_(params, self.max_grad_norm, norms[0])
        return True
