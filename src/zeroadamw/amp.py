"""Mixed precision with ``torch.amp.GradScaler``: the loss scale inside the update, one global inf check.

Both of GradScaler's protocols are supported: ``scaler.step(opt)`` passing itself as ``step(grad_scaler=...)``
(gradients are unscaled inside the update kernels; ``unscale_()`` could not see stage 2's sharded gradients), and
the attribute protocol (``opt.grad_scale`` / ``opt.found_inf`` set before ``step()``), for which the optimizer
must know its scaler (:meth:`GradScalerMixin.attach_grad_scaler`). Either way the inf/NaN check covers every
rank's shard (it is part of ``step()``'s agreement, :mod:`zeroadamw.agree`), and the scaler is told the global
result so every rank backs off its scale together.

:class:`GradScalerMixin` holds these methods of :class:`~zeroadamw.ShardedAdamW`.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["GradScalerMixin"]


class GradScalerMixin:
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
            visible = self.comm.dp_size == 1 or self.engine.grads_reduced
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
        visible = self.comm.dp_size == 1 or self.stage == 1 or self.engine.packed_at_step
        if state["stage"] is OptState.UNSCALED and visible:
            return None
        return grad_scaler._get_scale_async().to(self._device, torch.float32)

    def _scaler_errors(self, scale: Tensor | None) -> list[tuple[type, str]]:
        """What this rank finds wrong with the loss scale before the step's agreement (reported with the rest)."""
        if self.engine.fused and scale is not None:
            return [(RuntimeError, (
                "step_in_backward without max_grad_norm updates each bucket during backward, before the loss "
                "scale is known; with fp16 + GradScaler use step_in_backward=True with max_grad_norm=... (the "
                "update then waits for step()), or bf16 without a scaler"))]
        return []

    def _report_found_inf(self, grad_scaler, found: bool) -> None:
        state = grad_scaler._per_optimizer_states[id(self)]
        dev = grad_scaler._scale.device if grad_scaler._scale is not None else self._device
        state["found_inf_per_device"] = {dev: torch.full((), float(found), dtype=torch.float32, device=dev)}
