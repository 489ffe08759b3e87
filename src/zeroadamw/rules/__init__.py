"""The update rules of ShardedAdamW (``rule=``), one module each behind one interface (:class:`Rule`):

* :mod:`~zeroadamw.rules.adamw` -- AdamW (default);
* :mod:`~zeroadamw.rules.lomo` -- LOMO's SGD;
* :mod:`~zeroadamw.rules.adalomo` -- AdaLomo (factored second moment, grouped update normalisation).

A new rule: subclass :class:`Rule`, add it to :data:`RULES`, give it a reference kernel in
:mod:`zeroadamw.functional` and tests against it.
"""

from .adalomo import AdaLomoRule
from .adamw import AdamWRule
from .base import Rule
from .lomo import LomoRule

__all__ = ["Rule", "RULES", "get_rule", "AdamWRule", "LomoRule", "AdaLomoRule"]

RULES: dict[str, type[Rule]] = {"adamw": AdamWRule, "lomo": LomoRule, "adalomo": AdaLomoRule}


def get_rule(name: str) -> Rule:
    if not isinstance(name, str) or name not in RULES:
        raise ValueError(f"Unknown rule {name!r}; expected one of {', '.join(RULES)}")
    return RULES[name]()
