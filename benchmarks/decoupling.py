"""Loshchilov & Hutter's decoupling experiment, in small: learning rate x weight decay, three decay modes.

    python benchmarks/decoupling.py                    # full grid: 511 s on 2 busy CPU cores; writes docs/decoupling.*
    python benchmarks/decoupling.py --quick --out /tmp  # 2 x 3 grid per mode, ~1-2 min (smoke test)
    python benchmarks/decoupling.py --replot           # redraw docs/decoupling.png from docs/decoupling.json

Loshchilov & Hutter (ICLR 2019, "Decoupled Weight Decay Regularization") showed that with Adam + L2 the best
weight decay depends on the learning rate (the good region of the lr x wd grid is a diagonal), while with decay
decoupled from the gradient step the best weight decay barely moves with the learning rate. Their AdamW decays
by ``wd * eta_t`` where ``eta_t`` is the *schedule multiplier* -- our ``decay="independent"`` -- whereas PyTorch's
AdamW (our ``decay="decoupled"``) decays by ``lr_t * wd``, which ties the decay per step to the learning rate
again (the timescale is ``1 / (lr * wd)``).

Task: next-byte prediction on the docstrings of Python's standard library (``zeroadamw.demo.stdlib_corpus``, no
downloads), a byte MLP (12-byte context, embeddings 16, two hidden layers of 128 GELU, 78k params) trained on a
32 KiB slice for 4 epochs with batch 128 (1,024 steps; the model overfits, so regularisation matters), linear
warm-up (5 %) + cosine decay to 0; validation loss (nats/byte) on a disjoint 32 KiB slice. The same init and
batch order for every cell. Every run uses ``zeroadamw.ShardedAdamW(..., decay=mode)`` in one process, weight
decay on every parameter (the simple setting of the paper's experiments). Grid: 6 learning rates x (0 + 6 or 7
weight decays) per mode; all axes are spaced x sqrt(10), so in ``decoupled`` mode the diagonals hold lr * wd
constant.

Each distinct update is run once: wd = 0 is the same update in every mode, and ``independent`` with (lr, wd) is
exactly ``decoupled`` with (lr, wd / lr) because the schedule's peak is lr -- most regularised ``decoupled``
cells coincide with ``independent`` cells and reuse their run. Two such twins are re-run as
``decoupled`` to show the identity, and three cells are re-run with two more seeds to show the seed noise
(``checks`` in the JSON).

Outputs (``--out``, default ``docs/``): ``decoupling.png`` (three heatmaps, best cell boxed, best wd per lr
dotted), ``decoupling.json`` (every cell, plus the summary numbers) and ``decoupling.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import platform
import time

import numpy as np
import torch
from torch import nn

MODES = ("l2", "decoupled", "independent")
def _axis(lo: float, n: int) -> list[float]:
    """n values from 10**lo, x sqrt(10) apart."""
    return [10 ** (lo + 0.5 * i) for i in range(n)]


LRS = _axis(-3.5, 6)  # 3.2e-4 ... 0.1
WDS = {  # per mode, excluding 0
    "l2": _axis(-4.5, 6),  # 3.2e-5 ... 1e-2
    "decoupled": _axis(-1.5, 6),  # 0.032 ... 10
    "independent": _axis(-4.5, 7),  # 3.2e-5 ... 3.2e-2
}
QUICK_LRS = _axis(-3.0, 2)
QUICK_WDS = {"l2": _axis(-3.5, 2), "decoupled": _axis(-1.0, 2), "independent": _axis(-3.5, 2)}

CTX, EMB, HID = 12, 16, 128
TRAIN_BYTES, VAL_BYTES = 32 * 1024, 32 * 1024
BATCH, EPOCHS, WARMUP_FRAC = 128, 4, 0.05


class ByteMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(256, EMB)
        self.net = nn.Sequential(nn.Linear(CTX * EMB, HID), nn.GELU(), nn.Linear(HID, HID), nn.GELU(),
                                 nn.Linear(HID, 256))

    def forward(self, x):
        return self.net(self.embed(x).flatten(1))


_DATA = None


def data():
    """(train_x, train_y, val_x, val_y): all 12-byte windows of two disjoint slices of the corpus."""
    global _DATA
    if _DATA is None:
        from zeroadamw.demo import stdlib_corpus

        corpus = torch.frombuffer(bytearray(stdlib_corpus()), dtype=torch.uint8).long()
        # the train slice from the start, the validation slice from the middle (different modules)
        mid = len(corpus) // 2
        out = []
        for lo, n in ((0, TRAIN_BYTES), (mid, VAL_BYTES)):
            seq = corpus[lo : lo + n + CTX]
            x = seq.unfold(0, CTX, 1)[:-1]
            y = seq[CTX:]
            out += [x.contiguous(), y.contiguous()]
        _DATA = tuple(out)
    return _DATA


def train_one(job):
    mode, lr, wd, seed = job
    torch.set_num_threads(1)
    from zeroadamw import ShardedAdamW

    tx, ty, vx, vy = data()
    torch.manual_seed(seed)
    model = ByteMLP()
    steps_per_epoch = len(tx) // BATCH
    total = steps_per_epoch * EPOCHS
    warm = max(1, int(WARMUP_FRAC * total))
    opt = ShardedAdamW(model.parameters(), lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=wd, decay=mode)

    def factor(s):
        if s < warm:
            return (s + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, total - warm)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    g = torch.Generator().manual_seed(1234 + seed)
    t0 = time.perf_counter()
    diverged = False
    for epoch in range(EPOCHS):
        perm = torch.randperm(len(tx), generator=g)
        for i in range(steps_per_epoch):
            idx = perm[i * BATCH : (i + 1) * BATCH]
            loss = nn.functional.cross_entropy(model(tx[idx]), ty[idx])
            if not torch.isfinite(loss):
                diverged = True
                break
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            sched.step()
        if diverged:
            break
    with torch.no_grad():
        val = float("nan") if diverged else nn.functional.cross_entropy(model(vx), vy).item()
        trn = float("nan") if diverged else nn.functional.cross_entropy(model(tx), ty).item()
        wnorm = math.sqrt(sum(float(p.square().sum()) for p in model.parameters()))
    return {"mode": mode, "lr": lr, "weight_decay": wd, "seed": seed, "val_loss": val, "train_loss": trn,
            "weight_norm": wnorm, "steps": total, "seconds": time.perf_counter() - t0}


def grid_arrays(cells, mode, lrs, wds):
    """loss[i_lr, j_wd] of one mode's grid; column 0 = wd 0."""
    L = np.full((len(lrs), len(wds) + 1), np.nan)
    axis = [0.0] + list(wds)
    for c in cells:
        if c["mode"] == mode:
            L[lrs.index(c["lr"]), axis.index(c["weight_decay"])] = c["val_loss"]
    return L


def _key(mode, lr, wd):
    """Runs that perform the same update share a key: independent(lr, wd) is decoupled(lr, wd / lr) exactly
    (the schedule's peak is lr), and wd = 0 is one update in every mode."""
    if wd == 0:
        return ("none", round(math.log10(lr), 6), 0)
    if mode == "l2":
        return ("l2", round(math.log10(lr), 6), round(math.log10(wd), 6))
    w = wd / lr if mode == "independent" else wd
    return ("decoupled", round(math.log10(lr), 6), round(math.log10(w), 6))


def analyse(results, lrs, wds_by_mode):
    """Per mode: best cell; best wd per lr; slope of log10(best wd) against log10(lr); the regret of keeping the
    overall best wd fixed while lr changes (mean over lrs of loss(lr, wd*) - min over wd of loss(lr, .))."""
    out = {}
    for mode in MODES:
        wds = wds_by_mode[mode]
        L = grid_arrays(results, mode, lrs, wds)
        axis = [0.0] + list(wds)
        Lf = np.where(np.isfinite(L), L, np.inf)
        i, j = np.unravel_index(np.argmin(Lf), Lf.shape)
        best_per_lr = [axis[int(np.argmin(row))] for row in Lf]
        row_min = Lf.min(axis=1)
        fixed = Lf[:, j] - row_min
        usable = np.isfinite(row_min) & np.isfinite(Lf[:, j])
        pos = [(math.log10(lr), math.log10(w)) for lr, w, ok in zip(lrs, best_per_lr, np.isfinite(row_min))
               if w > 0 and ok]
        slope = float(np.polyfit(*zip(*pos), 1)[0]) if len(pos) >= 3 else None
        # the best lr x wd product (decoupled: the timescale) held fixed instead of wd
        diag = None
        if mode == "decoupled":
            prod = lrs[i] * axis[j]
            regs = []
            for a, lr in enumerate(lrs):
                w = prod / lr
                k = [b for b, x in enumerate(axis) if x > 0 and math.isclose(x, w, rel_tol=1e-6)]
                if k and np.isfinite(row_min[a]):
                    regs.append(float(Lf[a, k[0]] - row_min[a]))
            diag = {"lr_times_wd": prod, "mean_regret": float(np.mean(regs)) if regs else None, "rows": len(regs)}
        out[mode] = {
            "best": {"lr": lrs[i], "weight_decay": axis[j], "val_loss": float(L[i, j])},
            "best_weight_decay_per_lr": dict(zip([f"{lr:.3g}" for lr in lrs], best_per_lr)),
            "slope_log_best_wd_vs_log_lr": slope,
            "fixed_best_wd_mean_regret": float(np.mean(fixed[usable])),
            "fixed_best_wd_max_regret": float(np.max(fixed[usable])),
            "wd0_gain_at_best_lr": float(Lf[i, 0] - L[i, j]),
            "fixed_lr_times_wd": diag,
        }
    return out


def plot(results, lrs, wds_by_mode, path, steps):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grids = {m: grid_arrays(results, m, lrs, wds_by_mode[m]) for m in MODES}
    finite = np.concatenate([g[np.isfinite(g)] for g in grids.values()])
    vmin = float(finite.min())
    vmax = float(min(finite.max(), vmin + 0.6))
    fig, axes = plt.subplots(1, 3, figsize=(16, 5.2), constrained_layout=True)
    titles = {"l2": "Adam + L2  (decay='l2')", "decoupled": "AdamW, torch  (decay='decoupled')",
              "independent": "AdamW, L&H  (decay='independent')"}
    im = None
    for ax, mode in zip(axes, MODES):
        g = grids[mode]
        im = ax.imshow(np.where(np.isfinite(g), g, vmax), origin="lower", cmap="viridis_r", vmin=vmin, vmax=vmax,
                       aspect="auto")
        labels = ["0"] + [f"{w:.2g}" for w in wds_by_mode[mode]]
        ax.set_xticks(range(len(labels)), labels, rotation=45)
        ax.set_yticks(range(len(lrs)), [f"{lr:.2g}" for lr in lrs])
        ax.set_xlabel("weight decay λ")
        ax.set_ylabel("peak learning rate")
        ax.set_title(titles[mode])
        gf = np.where(np.isfinite(g), g, np.inf)
        for a in range(g.shape[0]):
            for b in range(g.shape[1]):
                txt = "div" if not np.isfinite(g[a, b]) else f"{g[a, b]:.3f}"
                ax.text(b, a, txt, ha="center", va="center", fontsize=7,
                        color="black" if np.isfinite(g[a, b]) and g[a, b] < vmin + 0.55 * (vmax - vmin) else "white")
        row_best = np.argmin(gf, axis=1)
        ax.plot(row_best, range(len(lrs)), "w:", lw=1.5)
        i, j = np.unravel_index(np.argmin(gf), gf.shape)
        ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, ec="red", lw=2.5))
    fig.colorbar(im, ax=axes, shrink=0.9, label="final validation loss (nats/byte)")
    fig.suptitle(f"Byte-level MLP on stdlib docstrings, {steps:,} steps, warm-up + cosine: final validation loss "
                 "(red box: best cell; dotted: best λ per learning rate)")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "docs"))
    ap.add_argument("--workers", type=int, default=2, help="processes (1 thread each)")
    ap.add_argument("--quick", action="store_true", help="2 x 3 grid per mode, for a smoke test")
    ap.add_argument("--no-check", action="store_true", help="skip the twin runs and the seed-noise runs")
    ap.add_argument("--replot", action="store_true", help="only redraw decoupling.png from decoupling.json in --out")
    args = ap.parse_args(argv)
    if args.replot:
        with open(os.path.join(args.out, "decoupling.json")) as fh:
            saved = json.load(fh)
        m = saved["meta"]
        plot(saved["cells"], m["learning_rates"], m["weight_decays"], os.path.join(args.out, "decoupling.png"),
             m["task"]["steps"])
        return m, saved["summary"], saved["checks"]
    lrs = QUICK_LRS if args.quick else LRS
    wds = QUICK_WDS if args.quick else WDS

    # every cell of the three grids; each distinct update is run once, with the mode of the first cell asking
    # for it (order: wd 0, l2, independent, decoupled)
    cells, jobs, key_of_job = [], [], {}
    for mode in ("l2", "independent", "decoupled"):
        for lr in lrs:
            for wd in [0.0] + list(wds[mode]):
                key = _key(mode, lr, wd)
                if key not in key_of_job:
                    key_of_job[key] = len(jobs)
                    jobs.append((mode if wd else "decoupled", lr, wd, 0))
                cells.append({"mode": mode, "lr": lr, "weight_decay": wd, "job": key_of_job[key]})
    n_grid = len(jobs)
    # checks: (a) decoupled twins of independent runs, run as decoupled (the identity above, measured);
    # (b) seed noise: the best-looking cells are unknown in advance, so re-run the wd = 0 cell and two
    # regularised cells of the middle learning rate with seeds 1 and 2
    twins, noise = [], []
    if not args.no_check:
        for c in cells:
            if c["mode"] == "decoupled" and c["weight_decay"] and jobs[c["job"]][0] == "independent":
                twins.append(len(jobs))
                jobs.append(("decoupled", c["lr"], c["weight_decay"], 0))
                if len(twins) == 2:
                    break
        mid = lrs[len(lrs) // 2]
        picks = (("decoupled", 0.0), ("decoupled", wds["decoupled"][min(2, len(wds["decoupled"]) - 1)]),
                 ("l2", wds["l2"][min(3, len(wds["l2"]) - 1)]))
        for mode, wd in picks:
            for seed in (1, 2):
                noise.append(len(jobs))
                jobs.append((mode, mid, wd, seed))
    t0 = time.perf_counter()
    if args.workers > 1:
        with mp.get_context("spawn").Pool(args.workers) as pool:
            runs = pool.map(train_one, jobs, chunksize=1)
    else:
        runs = [train_one(j) for j in jobs]
    wall = time.perf_counter() - t0
    for c in cells:
        r = runs[c.pop("job")]
        c.update(val_loss=r["val_loss"], train_loss=r["train_loss"], weight_norm=r["weight_norm"],
                 run_as={"mode": r["mode"], "weight_decay": r["weight_decay"]})
    summary = analyse(cells, lrs, wds)
    checks = {}
    if twins:
        pairs = []
        for t in twins:
            tw = runs[t]
            ind = next(runs[j] for j in range(n_grid) if runs[j]["mode"] == "independent"
                       and _key("independent", runs[j]["lr"], runs[j]["weight_decay"])
                       == _key("decoupled", tw["lr"], tw["weight_decay"]))
            pairs.append({"independent": [ind["lr"], ind["weight_decay"], ind["val_loss"]],
                          "decoupled": [tw["lr"], tw["weight_decay"], tw["val_loss"]],
                          "abs_diff": abs(ind["val_loss"] - tw["val_loss"])})
        checks["independent_equals_decoupled_wd_over_lr"] = pairs
    if noise:
        groups = {}
        for j in noise:
            r = runs[j]
            base = next(runs[i] for i in range(n_grid)
                        if _key(runs[i]["mode"], runs[i]["lr"], runs[i]["weight_decay"])
                        == _key(r["mode"], r["lr"], r["weight_decay"]))
            groups.setdefault((r["mode"], r["lr"], r["weight_decay"]), [base["val_loss"]]).append(r["val_loss"])
        checks["seed_noise"] = [{"mode": m, "lr": lr, "weight_decay": wd, "val_loss_seeds_0_1_2": v,
                                 "std": float(np.std(v, ddof=1))} for (m, lr, wd), v in groups.items()]
    tx, _, vx, _ = data()
    steps = len(tx) // BATCH * EPOCHS
    meta = {
        "command": "python benchmarks/decoupling.py" + (" --quick" if args.quick else ""),
        "machine": f"{_cpu_model()}, {os.cpu_count()} CPU cores, {platform.system()} {platform.release()}",
        "python": platform.python_version(), "torch": torch.__version__, "workers": args.workers,
        "wall_seconds": round(wall, 1), "runs": len(jobs), "grid_runs": n_grid, "cells": len(cells),
        "task": {"context": CTX, "embedding": EMB, "hidden": HID,
                 "params": sum(p.numel() for p in ByteMLP().parameters()),
                 "train_windows": len(tx), "val_windows": len(vx), "batch": BATCH, "epochs": EPOCHS, "steps": steps,
                 "warmup_steps": max(1, int(WARMUP_FRAC * steps)), "schedule": "linear warm-up + cosine to 0",
                 "betas": [0.9, 0.999], "eps": 1e-8, "decay_on": "every parameter"},
        "learning_rates": lrs, "weight_decays": wds,
    }
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "decoupling.json"), "w") as fh:
        json.dump({"meta": meta, "summary": summary, "checks": checks, "cells": cells}, fh, indent=1)
    plot(cells, lrs, wds, os.path.join(args.out, "decoupling.png"), steps)
    for mode in MODES:
        s = summary[mode]
        print(f"{mode:12s} best lr {s['best']['lr']:.3g} wd {s['best']['weight_decay']:.3g} "
              f"val {s['best']['val_loss']:.4f} | best wd per lr {list(s['best_weight_decay_per_lr'].values())} | "
              f"slope {s['slope_log_best_wd_vs_log_lr']} | fixed-wd regret mean {s['fixed_best_wd_mean_regret']:.4f}"
              f" max {s['fixed_best_wd_max_regret']:.4f} | wd0 gain {s['wd0_gain_at_best_lr']:.4f}")
    print(json.dumps(checks, indent=1))
    print(f"wall {wall:.0f} s for {len(jobs)} runs ({n_grid} distinct grid updates, {len(cells)} cells)")
    return meta, summary, checks


if __name__ == "__main__":
    main()
