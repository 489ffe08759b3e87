"""LOMO: plain SGD with weight decay (Lv et al., ACL 2024), usually fused into backward (``step_in_backward``).

No moments: the only state is ``step`` (and the fp32 master of bf16/fp16 params). Math:
:func:`zeroadamw.functional.sgd`.
"""

from __future__ import annotations

from .. import functional as F
from .base import Rule


class LomoRule(Rule):
    name = "lomo"

    def kernel(self, params, grads, steps, moments, idx, group, common, impl) -> None:
        F.sgd(params, grads, steps, **common)
