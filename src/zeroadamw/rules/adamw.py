"""AdamW (the default rule): decoupled / independent / L2 weight decay, bias-corrected moments.

The math is :func:`zeroadamw.functional.adamw` (reference, foreach and fused kernels, tested against
``torch.optim.AdamW``). State per param: ``exp_avg``, ``exp_avg_sq`` (views of the bucket's flat shard), ``step``.
"""

from __future__ import annotations

from .. import functional as F
from .base import Rule


class AdamWRule(Rule):
    name = "adamw"
    flat_moments = True
    plain_client = True

    def kernel(self, params, grads, steps, bucket, idx, group, common, impl) -> None:
        beta1, beta2 = group["betas"]
        F.adamw(params, grads, [bucket.shard_view(bucket.exp_avg, i) for i in idx],
                [bucket.shard_view(bucket.exp_avg_sq, i) for i in idx], steps,
                beta1=beta1, beta2=beta2, eps=group["eps"], impl=impl, **common)
