"""The control plane: every small collective of the optimizers, on the right device, without host reads.

The data plane (gradient buckets, parameter all-gathers) lives in :mod:`zeroadamw.engine`. Everything else that
ranks must agree on goes through here:

* **step statistics** -- per-group sums of squared shard gradients, which params got a gradient anywhere, which
  buckets had to be flushed, the error flag: packed into *one* tensor, one all-reduce per step
  (:meth:`Control.all_reduce_packed`), then *one* host read of the result;
* **per-bucket agreement** in fused step in backward (presence + finiteness): one all-reduce per bucket, the
  result stays on the device (no host read inside backward);
* **error agreement** -- a rank that found a problem encodes its message into a fixed-size byte tensor; every
  rank all-gathers them and raises the first (no object collectives, which on NCCL depend on
  ``torch.cuda.set_device`` having been called);
* **fill order** -- the launch order of buckets learnt at the first backward, broadcast over the optimizer's
  *world* group (never an expert subgroup);
* **layout check** at construction.

**Device rule.** A control tensor lives where the parameters live. A collective's tensors must be on a device
type the group has a backend for; that is read from the group itself (``ProcessGroup._device_types``), never
from the backend's name -- ``init_process_group()`` without a backend reports ``"undefined"`` and, on a GPU
machine, binds only NCCL. With CUDA params and a CPU-only group (``"cpu:gloo"``) control tensors go to the CPU
(that costs a host read, which only such a configuration pays).

**Strict mode** (``ZEROADAMW_STRICT_DEVICE=1``, on in the test suite; or :func:`set_strict`): every tensor given
to a collective by :class:`~zeroadamw.comm.Comm` is checked against its group's device types; a violation
raises at once instead of crashing (or hanging) inside the
backend on another machine.

**Host constants without copies.** Flags the host knows (which params landed, which buckets were flushed)
become device tensors through :meth:`Control.host_vector`: made by fills (no host-to-device copy, itself a sync
on CUDA) and cached per distinct pattern -- the pattern repeats every step, so after the first step it costs
nothing.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["Control", "group_device_types", "control_device", "set_strict", "strict_enabled", "DeviceError"]

_STRICT: bool | None = None
_MSG_BYTES = 2048  # bytes of an error message carried by the error agreement


class DeviceError(RuntimeError):
    """A tensor given to a collective is on a device its process group has no backend for (strict mode)."""


def strict_enabled() -> bool:
    if _STRICT is not None:
        return _STRICT
    return os.environ.get("ZEROADAMW_STRICT_DEVICE", "0") not in ("", "0", "false", "False")


def set_strict(on: bool | None) -> None:
    """Turn strict device checking on/off for this process (``None``: follow ``ZEROADAMW_STRICT_DEVICE``)."""
    global _STRICT
    _STRICT = on


def group_device_types(group) -> set[str] | None:
    """The device types ``group``'s backends take (``{"cpu"}``, ``{"cuda"}``, both), read from the group;
    ``None`` when this torch does not say (then every device is assumed to work)."""
    if group is None:
        if not (dist.is_available() and dist.is_initialized()):
            return None
        group = dist.group.WORLD
    types = getattr(group, "_device_types", None)
    if not types:
        return None
    return {d.type for d in types}


def control_device(group, param_device: torch.device | None) -> torch.device:
    """Where control tensors for ``group`` live: the params' device when the group takes it, else the CPU when the
    group takes that; otherwise a ValueError naming the fix."""
    dev = param_device or torch.device("cpu")
    types = group_device_types(group)
    if types is None or dev.type in types:
        return dev
    if "cpu" in types:
        return torch.device("cpu")
    raise ValueError(
        f"the process group has backends for {sorted(types)} only, but the parameters are on {dev}; move the model "
        f"to a device the group takes, or initialise torch.distributed with a backend for {dev.type} (e.g. "
        "init_process_group('cpu:gloo,cuda:nccl'))"
    )


def check_collective_device(t: Tensor, group, op: str) -> None:
    """Strict mode: raise :class:`DeviceError` if ``t`` is on a device type ``group`` has no backend for."""
    types = group_device_types(group)
    if types is not None and t.device.type not in types:
        raise DeviceError(
            f"{op}: a {t.device.type} tensor was given to a process group whose backends take {sorted(types)} "
            "(zeroadamw bug or a misconfigured group; this would fail inside the backend)"
        )


def _fill_vector(values: tuple, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A device tensor of host ``values`` made by fills of runs of equal values -- no host-to-device copy, which
    on CUDA would synchronise (and trip ``torch.cuda.set_sync_debug_mode("error")``)."""
    t = torch.zeros(len(values), dtype=dtype, device=device)
    start = 0
    for i in range(1, len(values) + 1):
        if i == len(values) or values[i] != values[start]:
            if values[start]:
                t[start:i].fill_(values[start])
            start = i
    return t


class Control:
    """The small collectives of one optimizer over its world :class:`~zeroadamw.comm.Comm` (see module docstring)."""

    def __init__(self, comm, param_device: torch.device | None) -> None:
        self.comm = comm
        self._param_device = param_device
        self.device = control_device(comm.group, param_device) if comm.world_size > 1 else (
            param_device or torch.device("cpu"))
        self._consts: dict[tuple, Tensor] = {}

    # ------------------------------------------------------------------------------------------- devices
    def follow(self, param_device: torch.device) -> None:
        """The params moved (``model.to(...)`` after the optimizer was built): control tensors follow."""
        if param_device == self._param_device:
            return
        self._param_device = param_device
        self.device = control_device(self.comm.group, param_device) if self.comm.world_size > 1 else param_device
        self._consts.clear()

    def device_for(self, comm) -> torch.device:
        """The control device for another group of the same optimizer (an expert group)."""
        if comm.world_size == 1:
            return self._param_device or torch.device("cpu")
        return control_device(comm.group, self._param_device)

    def host_vector(self, values, dtype: torch.dtype = torch.float32, device: torch.device | None = None) -> Tensor:
        """A read-only device tensor of host-known ``values``, cached per distinct pattern (no copy after the
        first time a pattern is seen). Callers must not modify it in place."""
        device = device or self.device
        key = (tuple(values), dtype, device)
        t = self._consts.get(key)
        if t is None:
            if len(self._consts) > 4096:
                self._consts.clear()
            t = _fill_vector(key[0], dtype, device)
            self._consts[key] = t
        return t

    # ------------------------------------------------------------------------------------------- collectives
    def all_reduce_packed(self, t: Tensor, comm=None, op=None, label: str = "control", async_op: bool = False):
        """All-reduce ``t`` (a packed control vector) over ``comm`` (default: the world) in place, returning it
        (``async_op=True``: a :class:`~zeroadamw.comm.Handle`; ``t`` holds the result after ``wait()``). Moves it
        to the group's control device and back when they differ (CUDA params on a CPU-only group)."""
        from .comm import Handle

        comm = comm or self.comm
        if comm.world_size == 1:
            return Handle() if async_op else t
        dev = self.device if comm is self.comm else self.device_for(comm)
        x = t if t.device == dev else t.to(dev)
        h = comm.all_reduce(x, op=op, label=label, async_op=async_op)
        back = (lambda: t.copy_(x)) if x is not t else None
        if async_op:
            return Handle(h, back)
        if back is not None:
            back()
        return t

    def check_same(self, h: int) -> bool:
        """Whether every rank passes the same 63-bit value ``h`` (one MAX all-reduce of ``[h, -h]``)."""
        if self.comm.world_size == 1:
            return True
        t = torch.tensor([h, -h], dtype=torch.int64, device=self.device)
        self.comm.all_reduce(t, op=dist.ReduceOp.MAX, label="control")
        a, b = t.tolist()
        return a == h and b == -h

    def broadcast_order(self, order: list[int]) -> list[int]:
        """Rank 0's ``order`` (a list of ints of the same length on every rank), over the world group."""
        if self.comm.world_size == 1:
            return list(order)
        t = torch.tensor(order, dtype=torch.int64, device=self.device)
        self.comm.broadcast(t, src=0)
        return t.tolist()

    def agree_errors(self, errors: list[tuple[type, str]]) -> None:
        """Collective, called when some rank flagged an error: every rank raises the first rank's first error
        (with the rank named). Encodes messages into fixed-size byte tensors: no object collectives."""
        n = self.comm.world_size
        if n == 1:
            if errors:
                exc, msg = errors[0]
                raise exc(msg)
            raise RuntimeError("zeroadamw: an error was flagged but no message was recorded")
        mine = torch.zeros(_MSG_BYTES, dtype=torch.uint8)
        if errors:
            exc, msg = errors[0]
            kind = {ValueError: 1, TypeError: 2}.get(exc, 3)
            data = msg.encode("utf-8", "replace")[: _MSG_BYTES - 1]
            mine[0] = kind
            mine[1 : 1 + len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        mine = mine.to(self.device)
        out = torch.empty(n * _MSG_BYTES, dtype=torch.uint8, device=self.device)
        self.comm.all_gather(out, mine, async_op=False)
        rows = out.view(n, _MSG_BYTES).cpu()
        for r in range(n):
            kind = int(rows[r, 0])
            if kind:
                raw = bytes(rows[r, 1:].tolist()).rstrip(b"\0").decode("utf-8", "replace")
                exc = {1: ValueError, 2: TypeError}.get(kind, RuntimeError)
                raise exc(f"{raw} (reported by rank {r})")
        raise RuntimeError("a rank reported an error in the optimizer but sent no message")
