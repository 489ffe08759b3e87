"""Count host reads of tensor values: ``.item()``, ``.tolist()``, ``float()/int()/bool()`` of a tensor, ``.cpu()``,
``.numpy()`` and ``.to("cpu")`` of a tensor on another device. On a GPU each of these drains the stream; the optimizer's hot path must make none
inside backward hooks and a constant number per ``step()``. Counted on CPU by wrapping the Tensor methods, so
the same code is held to the GPU rule without a GPU."""

from __future__ import annotations

import contextlib
import traceback

import torch

_METHODS = ("item", "tolist", "__float__", "__int__", "__bool__", "__index__", "cpu", "numpy")


class HostReads:
    def __init__(self) -> None:
        self.count = 0
        self.where: list[str] = []

    def hit(self, name: str) -> None:
        self.count += 1
        frames = [f for f in traceback.extract_stack()[:-2] if "zeroadamw" in f.filename]
        self.where.append(f"{name} at " + (f"{frames[-1].filename}:{frames[-1].lineno}" if frames else "?"))


@contextlib.contextmanager
def count_host_reads():
    """``with count_host_reads() as reads: ...`` -- ``reads.count``, ``reads.where`` (the zeroadamw line)."""
    reads = HostReads()
    saved = {name: getattr(torch.Tensor, name) for name in _METHODS + ("to",)}

    def wrap(name):
        orig = saved[name]

        def f(self, *a, **k):
            reads.hit(name)
            return orig(self, *a, **k)

        return f

    def to(self, *a, **k):
        dev = k.get("device", a[0] if a else None)
        # a move to the CPU is a read only from another device (on CPU, .to(params' device) is not one)
        if isinstance(dev, (str, torch.device)) and torch.device(dev).type == "cpu" and self.device.type != "cpu":
            reads.hit("to(cpu)")
        return saved["to"](self, *a, **k)

    try:
        for name in _METHODS:
            setattr(torch.Tensor, name, wrap(name))
        torch.Tensor.to = to
        yield reads
    finally:
        for name, f in saved.items():
            setattr(torch.Tensor, name, f)


def reads_per_step(loss_at, opt, steps: int) -> dict:
    """Train ``steps`` steps (``loss_at(step)`` gives the loss) and count host reads in each backward and each
    ``opt.step()``: ``{"backward": [...], "step": [...], "where": [...]}``."""
    out = {"backward": [], "step": [], "where": []}
    for step in range(steps):
        loss = loss_at(step)
        with count_host_reads() as rb:
            loss.backward()
        with count_host_reads() as rs:
            opt.step()
        opt.zero_grad()
        out["backward"].append(rb.count)
        out["step"].append(rs.count)
        out["where"].append(rb.where + rs.where)
    return out
