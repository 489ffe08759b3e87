"""``zeroadamw plot LOG [-o OUT.png]``: draw the diagnostics curves of a run to one PNG (matplotlib).

LOG is a JSONL file written by :class:`zeroadamw.diagnostics.DiagnosticsLogger` (one record per line) or a
Hugging Face ``trainer_state.json`` (its ``log_history``, where :func:`zeroadamw.diagnostics.attach` put the
values). One panel per quantity that the log holds -- loss, learning rate, parameter norm, gradient norm
(pre-clip solid, post-clip dashed), update-to-weight ratio, effective decay per step -- with one line per param
group, against the step.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re

__all__ = ["read_log", "plot", "add_arguments", "run"]

PANELS = [  # (title, metric suffix, log-scale y)
    ("learning rate", "lr", False),
    ("parameter L2 norm", "param_norm", False),
    ("gradient L2 norm (solid: before clipping, dashed: after)", "grad_norm", True),
    ("update / weight ratio", "update_ratio", True),
    ("effective decay per step", "effective_decay", True),
]


def read_log(path: str) -> list[dict]:
    """The records of a DiagnosticsLogger JSONL file or of a trainer_state.json's ``log_history``."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no log at {path!r}: pass a DiagnosticsLogger .jsonl or a trainer_state.json")
    with open(path) as f:
        text = f.read()
    stripped = text.lstrip()
    if stripped.startswith("{") and '"log_history"' in text:
        try:
            return [r for r in json.loads(text)["log_history"] if "step" in r]
        except json.JSONDecodeError:
            pass
    records = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not a JSON line ({e}); expected a DiagnosticsLogger JSONL file or a "
                             "trainer_state.json") from None
        if isinstance(rec, dict) and "step" in rec:
            records.append(rec)
    if not records:
        raise ValueError(f"{path}: no records with a 'step' (is it a DiagnosticsLogger JSONL / trainer_state.json?)")
    return records


def _series(records: list[dict], key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for r in records:
        v = r.get(key)
        if isinstance(v, (int, float)) and math.isfinite(v):
            xs.append(r["step"])
            ys.append(float(v))
    return xs, ys


def plot(records: list[dict], out: str, title: str | None = None) -> list[str]:
    """Draw ``records`` to ``out`` (PNG); returns the panel titles drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted({k for r in records for k in r})
    group_key = re.compile(r"^(?:(?P<prefix>.*/))?(?P<group>[^/]+)/(?P<metric>[^/]+)$")
    by_metric: dict[str, list[tuple[str, str]]] = {}
    for k in keys:
        m = group_key.match(k)
        if m:  # "diag/grad_norm" (the whole model) reads as group "diag": label it so
            label = "all groups" if m["prefix"] is None and m["group"] == "diag" else m["group"]
            by_metric.setdefault(m["metric"], []).append((label, k))
    panels = []
    if any("loss" in r for r in records):
        panels.append(("loss", [("loss", "loss")], False, []))
    for name, metric, logy in PANELS:
        lines = by_metric.get(metric, [])
        dashed = by_metric.get("grad_norm_clipped", []) if metric == "grad_norm" else []
        if lines:
            panels.append((name, lines, logy, dashed))
    if not panels:
        raise ValueError("the log has none of the diagnostics keys (loss, */param_norm, */grad_norm, ...)")
    cols = 2 if len(panels) > 1 else 1
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6.0 * cols, 3.2 * rows), squeeze=False)
    for ax, (name, lines, logy, dashed) in zip(axes.flat, panels):
        for label, key in lines:
            xs, ys = _series(records, key)
            (line,) = ax.plot(xs, ys, label=label)
            for dlabel, dkey in dashed:
                if dlabel == label:
                    dx, dy = _series(records, dkey)
                    ax.plot(dx, dy, ls="--", color=line.get_color())
        if logy and all(y > 0 for _, k in lines for y in _series(records, k)[1]):
            ax.set_yscale("log")
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if len(lines) > 1:
            ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return [p[0] for p in panels]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("log", help="DiagnosticsLogger JSONL file, or a Trainer checkpoint's trainer_state.json")
    parser.add_argument("-o", "--out", help="PNG to write (default: LOG with .png)")
    parser.add_argument("--title", help="figure title")


def run(args: argparse.Namespace) -> int:
    out = args.out or os.path.splitext(args.log)[0] + ".png"
    try:
        panels = plot(read_log(args.log), out, args.title)
    except (FileNotFoundError, ValueError) as e:
        print(f"zeroadamw plot: {e}")
        return 2
    print(f"wrote {out} ({', '.join(panels)})")
    return 0
