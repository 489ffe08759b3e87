"""Parameter all-gathers left in flight after ``step()`` (``overlap_param_gather=True``), waited per module by
the next forward.

With params as views of their buckets' flat buffers (:meth:`zeroadamw.buckets.Bucket.bind_params`) the all-gather
of an updated bucket writes the params in place, so nothing has to happen after it but waiting. Instead of
waiting in ``step()``, :class:`DeferredGathers` keeps each bucket's handle and one process-wide module forward
pre-hook (``torch.nn.modules.module.register_module_forward_pre_hook``) waits, before a module runs, for the
buckets holding that module's *own* parameters -- so the gather of the last layers' buckets overlaps the first
layers' forward (Megatron's ``overlap_param_gather``). Everything else that reads params waits for all first:
the next ``step()`` (per bucket, before updating it), ``state_dict()`` / ``load_state_dict()``,
:mod:`zeroadamw.checkpoint`, and ``optimizer.wait_params()``, which a user calls before reading params outside a
forward (``model.state_dict()``, an EMA update, ``p.detach()``, a module of one's own that reads a child's weight
without calling the child): those cannot be intercepted, which is why the option is off by default. torch's own
modules that read their children's weights directly (``nn.MultiheadAttention``'s ``out_proj``, the Transformer
layers' fast path) wait for their whole subtree.
"""

from __future__ import annotations

import weakref

import torch
from torch import Tensor

from .comm import Handle

__all__ = ["DeferredGathers"]


class DeferredGathers:
    """The in-flight all-gathers of one optimizer's buckets, by bucket (see the module docstring)."""

    def __init__(self, where: dict[Tensor, tuple]) -> None:
        self.on = False  # overlap_param_gather
        self.where = where  # param -> (bucket, index): the engine's map
        self.pending: dict[int, Handle] = {}  # id(bucket) -> its all-gather, in launch order
        self.hook = None

    def __len__(self) -> int:
        return len(self.pending)

    def __contains__(self, bucket) -> bool:
        return id(bucket) in self.pending

    def keep(self, bucket, handle: Handle | None) -> Handle | None:
        """``bucket``'s updated params are being all-gathered (``handle``). When on, keep the gather in flight and
        return None; else return the handle, for the caller to wait on."""
        if handle is None or not self.on:
            return handle
        self.pending[id(bucket)] = handle
        if self.hook is None:
            ref = weakref.ref(self)
            self.hook = torch.nn.modules.module.register_module_forward_pre_hook(
                lambda module, args, ref=ref: _pre_forward(ref, module))
        return None

    def wait(self, bucket) -> None:
        """Wait for ``bucket``'s gather (if one is in flight)."""
        h = self.pending.pop(id(bucket), None)
        if h is not None:
            h.wait()

    def wait_all(self) -> None:
        while self.pending:
            self.pending.pop(next(iter(self.pending))).wait()

    def wait_module(self, module: torch.nn.Module) -> None:
        """Wait for the buckets holding ``module``'s own params (all its params, for the torch modules known to
        read their children's weights without calling them: ``nn.MultiheadAttention``, the Transformer layers)."""
        params = module.parameters() if isinstance(module, _READS_CHILDREN) else module._parameters.values()
        for p in params:
            hit = self.where.get(p) if p is not None else None
            if hit is not None:
                self.wait(hit[0])

    def remove_hook(self) -> None:
        if self.hook is not None:
            self.hook.remove()
            self.hook = None

    def __del__(self) -> None:
        self.remove_hook()


_READS_CHILDREN = (torch.nn.MultiheadAttention, torch.nn.TransformerEncoderLayer, torch.nn.TransformerDecoderLayer,
                   torch.nn.TransformerEncoder, torch.nn.TransformerDecoder, torch.nn.Transformer)


def _pre_forward(ref: weakref.ref, module: torch.nn.Module) -> None:
    gathers = ref()
    if gathers is not None and gathers.pending:
        gathers.wait_module(module)
