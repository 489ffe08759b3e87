"""Weight-decay schedules for zeroadamw's optimizers (learning-rate schedules come from torch / transformers).

A weight-decay schedule multiplies each param group's base weight decay :math:`\\lambda` (its ``weight_decay`` at
construction, kept in the group as ``initial_weight_decay``) by :math:`m(t)`, where :math:`t` counts the optimizer
steps *taken* so far (a step skipped for NaN/Inf gradients does not count), so the update of step
:math:`t` uses :math:`\\lambda_t = \\lambda\\, m(t)`:

* ``"constant"``: :math:`m(t) = 1`;
* ``"linear"``: :math:`m(t) = \\max(0,\\ 1 - t/T)`;
* ``"cosine"``: :math:`m(t) = \\tfrac12\\,(1 + \\cos(\\pi \\min(t, T)/T))`;
* a callable ``f(t: int) -> float``: :math:`m(t) = f(t)` (finite and >= 0).

``T`` is ``wd_schedule_steps``. The current :math:`\\lambda_t` is the group's ``weight_decay`` (what every kernel
reads, what loggers see), and ``wd_step`` is :math:`t`; both are plain numbers in ``state_dict()`` and in
checkpoints, so a resumed run continues the schedule where it stopped. The schedule itself (a name or a callable)
is *not* saved: pass it again when you rebuild the optimizer, as you would rebuild an LR scheduler.

How each decay mode uses :math:`\\lambda_t` with a scheduled lr :math:`\\eta_t` (peak :math:`\\eta_{max}`, the
group's ``initial_lr``) and the Adam direction :math:`\\hat u_t = \\hat m_t / (\\sqrt{\\hat v_t} + \\epsilon)`:

* ``decoupled`` (torch.optim.AdamW): :math:`\\theta_t = (1 - \\eta_t\\lambda_t)\\,\\theta_{t-1} - \\eta_t \\hat u_t`;
* ``independent``: :math:`\\theta_t = (1 - \\tfrac{\\eta_t}{\\eta_{max}}\\lambda_t)\\,\\theta_{t-1} - \\eta_t
  \\hat u_t` -- the decay follows the *shape* of the lr schedule but not its size;
* ``l2``: :math:`g_t \\leftarrow g_t + \\lambda_t\\theta_{t-1}`, then plain Adam -- the decay goes through the
  moments and the adaptive normalisation.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Union

__all__ = ["WD_SCHEDULES", "wd_multiplier", "resolve_wd_schedule", "portable_wd_fn"]

WD_SCHEDULES = ("constant", "linear", "cosine")

WdSchedule = Union[str, Callable[[int], float], None]


def wd_multiplier(name: str, t: int, total: int) -> float:
    """:math:`m(t)` of a named schedule over ``total`` steps (see the module docstring)."""
    if name == "constant":
        return 1.0
    if name == "linear":
        return max(0.0, 1.0 - t / total)
    if name == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(t, total) / total))
    raise ValueError(f"unknown weight-decay schedule {name!r}; expected one of {', '.join(WD_SCHEDULES)} or a callable")


def resolve_wd_schedule(schedule: WdSchedule, steps: int | None, where: str = "") -> Callable[[int], float] | None:
    """``schedule`` (a name, a callable of the step, or None) as a checked callable ``t -> m(t)``, or None."""
    if schedule is None:
        return None
    if isinstance(schedule, str):
        if schedule not in WD_SCHEDULES:
            raise ValueError(f"unknown wd_schedule {schedule!r}{where}; expected one of {', '.join(WD_SCHEDULES)}, "
                             "a callable step -> multiplier, or None")
        if schedule != "constant" and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
            raise ValueError(f"wd_schedule={schedule!r}{where} needs wd_schedule_steps=T (a positive int: the steps "
                             f"over which the decay goes to zero, usually the run's total optimizer steps), got {steps!r}")
        name = schedule

        def fn(t: int) -> float:
            return wd_multiplier(name, t, steps)

        fn.__name__ = f"wd_{name}"
        return fn
    if callable(schedule):
        return schedule
    raise TypeError(f"wd_schedule{where} must be one of {', '.join(WD_SCHEDULES)}, a callable step -> multiplier, or "
                    f"None; got {type(schedule).__name__}")


def _multiplier(fn: Callable[[int], float], t: int) -> float:
    m = fn(t)
    try:
        m = float(m)
    except (TypeError, ValueError):
        raise TypeError(f"the weight-decay schedule returned {m!r} at step {t}; it must return a float") from None
    if not math.isfinite(m) or m < 0:
        raise ValueError(f"the weight-decay schedule returned {m} at step {t}; the multiplier must be finite and >= 0")
    return m


class WdScheduleMixin:
    """Per-group weight-decay schedules for an optimizer: call ``_wd_take`` / ``_wd_register`` from
    ``add_param_group`` and ``_advance_wd_schedule()`` after every taken step."""

    _wd_fns: list

    def _wd_take(self, group: dict, default: WdSchedule, default_steps: int | None):
        """Pop and check the group's schedule (before the group is added: a bad one changes nothing)."""
        schedule = group.pop("wd_schedule", default)
        steps = group.pop("wd_schedule_steps", default_steps)
        fn = resolve_wd_schedule(schedule, steps, f" (param group {len(getattr(self, '_wd_fns', []))})")
        if fn is not None:
            _multiplier(fn, int(group.get("wd_step", 0)))
        return fn

    def _wd_register(self, group: dict, fn) -> None:
        """The group was added: apply m(t) of its current step."""
        if not hasattr(self, "_wd_fns"):
            self._wd_fns = []
        self._wd_fns.append(fn)
        if fn is not None:
            group.setdefault("initial_weight_decay", float(group["weight_decay"]))
            group.setdefault("wd_step", 0)
            group["weight_decay"] = group["initial_weight_decay"] * _multiplier(fn, group["wd_step"])

    def _record_step_hparams(self) -> None:
        """What this step uses, per group: (lr, weight_decay, decay, lr_max) -- read by zeroadamw.diagnostics
        after schedulers have moved the groups on."""
        self.last_step_hparams = [
            (float(g["lr"]), float(g.get("weight_decay", 0.0)), g.get("decay", "decoupled"),
             float(g.get("max_lr", g.get("initial_lr", g["lr"])))) for g in self.param_groups]

    def _advance_wd_schedule(self) -> None:
        """A step was taken: move every scheduled group to m(t + 1) (all evaluated before any is changed)."""
        new = []
        for group, fn in zip(self.param_groups, getattr(self, "_wd_fns", ())):
            if fn is not None:
                t = int(group.get("wd_step", 0)) + 1
                new.append((group, t, group.get("initial_weight_decay", group["weight_decay"]) * _multiplier(fn, t)))
        for group, t, wd in new:
            group["wd_step"] = t
            group["weight_decay"] = wd


def portable_wd_fn(fn):
    """A named weight-decay schedule (a closure of :func:`zeroadamw.schedules.resolve_wd_schedule`) as an
    equivalent picklable ``functools.partial``; anything else unchanged."""
    named = resolve_wd_schedule("constant", None).__code__
    if callable(fn) and getattr(fn, "__code__", None) is named and fn.__closure__:
        cells = dict(zip(fn.__code__.co_freevars, (c.cell_contents for c in fn.__closure__)))
        if "name" in cells and "steps" in cells:
            return functools.partial(wd_multiplier, cells["name"], total=cells["steps"])
    return fn
