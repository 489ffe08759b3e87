"""``zeroadamw plot LOG [-o OUT.png]``: draw the diagnostics curves of a run to one PNG (matplotlib).

LOG is a JSONL file written by :class:`zeroadamw.diagnostics.DiagnosticsLogger` or by the HF callback
(:func:`zeroadamw.diagnostics.attach`: ``OUTPUT_DIR/diagnostics.jsonl``), one record per line, or a Hugging Face
``trainer_state.json`` (its ``log_history``, with ``attach(trainer, into_logs=True)``). One panel per quantity that
the log holds -- loss (train, and validation where the log has ``eval_loss``), learning rate, parameter norm,
gradient norm (pre-clip solid, post-clip dashed), update-to-weight ratio, effective decay per step -- with one line
per param group (the same colour in every panel), against the optimizer step.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re

__all__ = ["read_log", "build_figure", "plot", "add_arguments", "run"]

PANELS = [  # (title, metric suffix, y-axis label, log-scale y)
    ("learning rate", "lr", "η (dimensionless, per step)", False),
    ("parameter L2 norm", "param_norm", "‖θ‖₂ (L2 norm of the weights)", False),
    ("gradient L2 norm", "grad_norm", "‖g‖₂ (L2 norm of the mean gradient)", True),
    ("update / weight ratio", "update_ratio", "‖Δθ‖ / ‖θ‖ (ratio, per step)", True),
    ("effective decay per step", "effective_decay", "η·λ (fraction of the weights, per step)", True),
]
ALL_GROUPS = "all groups (whole model)"
WHOLE_MODEL = "black"     # the whole model: train loss, the all-groups gradient norm
VALIDATION = "tab:gray"   # validation loss
GROUP_COLOURS = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink",
                 "tab:olive", "tab:cyan"]  # one per param group, the same in every panel


def read_log(path: str) -> list[dict]:
    """The records of a DiagnosticsLogger / DiagnosticsCallback JSONL file or of a trainer_state.json's
    ``log_history``."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no log at {path!r}: pass a diagnostics .jsonl or a trainer_state.json")
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
            raise ValueError(f"{path}:{n}: not a JSON line ({e}); expected a diagnostics JSONL file or a "
                             "trainer_state.json") from None
        if isinstance(rec, dict) and "step" in rec:
            records.append(rec)
    if not records:
        raise ValueError(f"{path}: no records with a 'step' (is it a diagnostics JSONL / trainer_state.json?)")
    return records


def _series(records: list[dict], key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for r in records:
        v = r.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            xs.append(r["step"])
            ys.append(float(v))
    return xs, ys


def build_figure(records: list[dict], title: str | None = None, loss_unit: str | None = None):
    """The diagnostics figure of ``records``: ``(matplotlib Figure, panel titles)``; the caller saves / closes it.

    One panel per quantity the log holds. Colours mean the same in every panel: one colour per param group,
    black for the whole model (train loss; the gradient norm over all groups), grey for the validation loss
    (``eval_loss`` records). In the gradient-norm panel solid lines are before clipping, dashed after. Lines
    never hide each other: each group's line is thinner than the one before and drawn above it, the all-groups
    line thinnest, on top. A panel drawn on a log scale says so in its title and y label. ``loss_unit`` labels
    the loss axis (e.g. ``"nats/token"`` for a language model's cross-entropy)."""
    import matplotlib

    if matplotlib.get_backend().lower() not in ("agg", "pdf", "svg", "ps", "cairo"):
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    keys = sorted({k for r in records for k in r})
    group_key = re.compile(r"^(?:(?P<prefix>.*/))?(?P<group>[^/]+)/(?P<metric>[^/]+)$")
    by_metric: dict[str, list[tuple[str, str]]] = {}
    for k in keys:
        m = group_key.match(k)
        if m:  # "diag/grad_norm" (the whole model) reads as group "diag": label it so
            label = ALL_GROUPS if m["prefix"] is None and m["group"] == "diag" else m["group"]
            by_metric.setdefault(m["metric"], []).append((label, k))
    groups = sorted({label for lines in by_metric.values() for label, _ in lines if label != ALL_GROUPS})
    colour = {g: GROUP_COLOURS[i % len(GROUP_COLOURS)] for i, g in enumerate(groups)}
    colour[ALL_GROUPS] = WHOLE_MODEL

    panels = []  # (title, ylabel, [(label, key, colour, style)], logy)
    loss_lines = []
    if any("loss" in r for r in records):
        loss_lines.append(("train loss", "loss", WHOLE_MODEL, "-"))
    if any("eval_loss" in r for r in records):
        loss_lines.append(("validation loss", "eval_loss", VALIDATION, "o-"))
    if loss_lines:
        panels.append(("loss", f"loss ({loss_unit})" if loss_unit else "loss (as logged)", loss_lines, False))
    for name, metric, ylabel, logy in PANELS:
        lines = [(label, key, colour[label], "-") for label, key in by_metric.get(metric, [])]
        if metric == "grad_norm":
            lines += [(label, key, colour[label], "--") for label, key in by_metric.get("grad_norm_clipped", [])]
        if lines:
            panels.append((name, ylabel, lines, logy))
    if not panels:
        raise ValueError("the log has none of the diagnostics keys (loss, */param_norm, */grad_norm, ...)")
    cols = 2 if len(panels) > 1 else 1
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6.4 * cols, 3.4 * rows), squeeze=False)
    width = {g: max(1.4, 3.4 - 0.7 * i) for i, g in enumerate(groups)}  # later groups thinner, drawn on top:
    rank = {g: i for i, g in enumerate(groups)}                          # equal curves stay visible
    for ax, (name, ylabel, lines, logy) in zip(axes.flat, panels):
        lines.sort(key=lambda ln: (ln[0] == ALL_GROUPS, rank.get(ln[0], -1), ln[3] == "--"))
        for label, key, c, style in lines:
            xs, ys = _series(records, key)
            ax.plot(xs, ys, style, color=c, label=label if style != "--" else None, ms=4,
                    lw=width.get(label, 1.1), zorder=2 + rank.get(label, len(groups)) / (len(groups) + 1))
        if logy and all(y > 0 for _, k, _, _ in lines for y in _series(records, k)[1]):
            ax.set_yscale("log")
            name, ylabel = f"{name} (log scale)", f"{ylabel}, log scale"
        handles, labels = ax.get_legend_handles_labels()
        if any(style == "--" for *_, style in lines):
            handles += [Line2D([], [], color="0.4", ls="-"), Line2D([], [], color="0.4", ls="--")]
            labels += ["before clipping (solid)", "after clipping (dashed)"]
        ax.set_title(name, fontsize=10)
        ax.set_ylabel(ylabel, fontsize=9)
        ax.set_xlabel("optimizer step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if handles:
            ax.legend(handles, labels, fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig, [p[0] for p in panels]


def plot(records: list[dict], out: str, title: str | None = None, loss_unit: str | None = None) -> list[str]:
    """Draw ``records`` to ``out`` (PNG, see :func:`build_figure`); returns the panel titles drawn."""
    import matplotlib.pyplot as plt

    fig, panels = build_figure(records, title, loss_unit)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return panels


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("log", help="DiagnosticsLogger JSONL file, or a Trainer checkpoint's trainer_state.json")
    parser.add_argument("-o", "--out", help="PNG to write (default: LOG with .png)")
    parser.add_argument("--title", help="figure title")
    parser.add_argument("--loss-unit", help="unit of the logged loss for its axis label, e.g. nats/token (a "
                        "language model's cross-entropy)")


def run(args: argparse.Namespace) -> int:
    out = args.out or os.path.splitext(args.log)[0] + ".png"
    try:
        panels = plot(read_log(args.log), out, args.title, getattr(args, "loss_unit", None) or None)
    except (FileNotFoundError, ValueError) as e:
        print(f"zeroadamw plot: {e}")
        return 2
    print(f"wrote {out} ({', '.join(panels)})")
    return 0
