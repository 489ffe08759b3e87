"""AdamW (the default rule): decoupled / independent / L2 weight decay, bias-corrected moments.

The math is :func:`zeroadamw.functional.adamw` (reference, foreach and fused kernels, tested against
``torch.optim.AdamW``). State per param: ``exp_avg``, ``exp_avg_sq`` (views of the bucket's flat shard), ``step``; with ``state_dtype``
``"bf16"`` / ``"int8"`` the kernel runs on fp32 working copies of the stored moments (:mod:`zeroadamw.storage`).
"""

from __future__ import annotations

from .. import functional as F
from .base import Rule


class AdamWRule(Rule):
    name = "adamw"
    flat_moments = True
    plain_client = True

    def kernel(self, params, grads, steps, moments, idx, group, common, impl) -> None:
        beta1, beta2 = group["betas"]
        F.adamw(params, grads, moments[0], moments[1], steps,
                beta1=beta1, beta2=beta2, eps=group["eps"], impl=impl, **common)
