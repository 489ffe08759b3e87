"""The AdamW update kernel alone vs torch.optim.AdamW, against the machine's memory bandwidth, in one run.

    python benchmarks/kernel_bandwidth.py [--params-m 16] [--trials 30] [--device cpu|cuda]
                                          [--json benchmarks/results/kernel_bandwidth.json] [--md docs/kernel_bandwidth.md]

An fp32 AdamW step reads param, grad, exp_avg, exp_avg_sq and writes param, exp_avg, exp_avg_sq: 28 bytes per
parameter at the least (the STREAM convention: bytes the algorithm must read and write; no write-allocate
traffic). The kernel's effective bandwidth is 28 x params / time; divided by the memory bandwidth measured in
the same run (a STREAM-style copy ``a = b``, 8 bytes/element, and triad ``a = b + s * c``, 12 bytes/element, on
arrays of the same size as the parameters) it says how close the step is to the limit of the machine.

Contenders, each with its own params and state on the same gradients, in two layouts:

* ``flat``: one contiguous tensor -- what ShardedAdamW hands the kernel (a bucket's owned shard is flat);
* ``llama``: LLaMA-shaped tensors (embedding + layers of q, k, v, o, gate, up, down, 2 norms at hidden 1024)
  -- per-parameter tensors, as torch.optim.AdamW and the plain zeroadamw.AdamW see them;

and four kernels: ``zeroadamw.functional.adamw(impl="fused")`` (``torch._fused_adamw_``, called directly),
``impl="foreach"``, ``torch.optim.AdamW(fused=True).step()`` and ``torch.optim.AdamW(foreach=True).step()``.

Each trial runs every contender and the two bandwidth probes once, in a shuffled order; the ratios are medians
over trials of ratios taken within a trial (paired), so slow drifts of the machine (other jobs, frequency)
cancel. Target: the zeroadamw kernel's throughput >= torch fused AdamW's (ratio of throughputs >= 1.0), printed
with PASS / MISS and the measured number.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import statistics
import sys
import time

import torch

from zeroadamw import functional as F

BYTES_PER_PARAM = 28  # fp32 AdamW: read p, g, m, v (16 B) + write p, m, v (12 B)
HYPER = dict(lr=1e-4, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1)


def llama_shapes(total: int, hidden: int = 1024, inter: int = 2816) -> list[tuple[int, ...]]:
    """LLaMA-layer tensors (q, k, v, o, gate, up, down, 2 norms) + an embedding, ~``total`` elements."""
    hidden = min(hidden, max(8, int((total / 40) ** 0.5)))  # tiny runs (tests): keep several layers
    inter = max(8, int(hidden * 2.75))
    layer = [(hidden, hidden)] * 4 + [(inter, hidden)] * 2 + [(hidden, inter)] + [(hidden,)] * 2
    per_layer = sum(torch.Size(s).numel() for s in layer)
    out, n = [], 0
    while n + per_layer <= total * 0.85:
        out += layer
        n += per_layer
    rows = max(1, (total - n) // hidden)
    return [(rows, hidden)] + out


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


NOTE_ABOVE_100 = (
    "A fraction above 100% means the probe is not the ceiling: the copy / triad probes are torch ops "
    "counted the STREAM way (no write-allocate traffic), and a plain torch copy does not reach the "
    "hardware limit on this machine. Read it as: the fused AdamW step moves its 28 B/param at least as "
    "fast as torch moves bytes in a copy -- it is memory-bound, at the speed of the machine's memory.")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params-m", type=float, default=16.0, help="millions of fp32 params per layout")
    ap.add_argument("--trials", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", default="benchmarks/results/kernel_bandwidth.json")
    ap.add_argument("--md", default="docs/kernel_bandwidth.md")
    args = ap.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    total = int(args.params_m * 1e6)
    layouts = {"flat": [(total,)], "llama": llama_shapes(total)}
    n_of = {k: sum(torch.Size(s).numel() for s in v) for k, v in layouts.items()}
    grads = {k: [torch.randn(s, device=device) * 1e-3 for s in v] for k, v in layouts.items()}
    base = {k: [torch.randn(s, device=device) * 0.02 for s in v] for k, v in layouts.items()}

    def make(kernel: str, layout: str):
        params = [b.clone() for b in base[layout]]
        if kernel.startswith("torch"):
            ps = [torch.nn.Parameter(p) for p in params]
            for p, g in zip(ps, grads[layout]):
                p.grad = g
            opt = torch.optim.AdamW(ps, lr=HYPER["lr"], betas=(HYPER["beta1"], HYPER["beta2"]), eps=HYPER["eps"],
                                    weight_decay=HYPER["weight_decay"],
                                    **({"fused": True} if kernel == "torch_fused" else {"foreach": True}))
            return opt.step
        m = [torch.zeros_like(p) for p in params]
        v = [torch.zeros_like(p) for p in params]
        steps = [torch.zeros((), dtype=torch.float32) for _ in params]
        impl = kernel.split("_")[1]

        def step():
            F.adamw(params, grads[layout], m, v, steps, impl=impl, **HYPER)

        return step

    kernels = ["zeroadamw_fused", "zeroadamw_foreach", "torch_fused", "torch_foreach"]
    runners = {f"{k}/{lay}": make(k, lay) for lay in layouts for k in kernels}
    nb = max(n_of.values())
    a, b, c = (torch.rand(nb, device=device) for _ in range(3))
    runners["copy"] = lambda: a.copy_(b)
    runners["triad"] = lambda: torch.add(b, c, alpha=3.0, out=a)
    moved = {name: BYTES_PER_PARAM * n_of[name.split("/")[1]] for name in runners if "/" in name}
    moved.update(copy=8 * nb, triad=12 * nb)

    times = {k: [] for k in runners}
    names = list(runners)
    for trial in range(args.warmup + args.trials):
        order = names[:]
        random.Random(trial).shuffle(order)
        for k in order:
            sync(device)
            t0 = time.perf_counter()
            runners[k]()
            sync(device)
            if trial >= args.warmup:
                times[k].append(time.perf_counter() - t0)

    med = {k: statistics.median(v) for k, v in times.items()}
    gbps = {k: moved[k] / med[k] / 1e9 for k in runners}
    bw = max(gbps["copy"], gbps["triad"])

    def paired(num, den):  # throughput of num / throughput of den = time(den) / time(num), per trial
        r = sorted(td / tn for tn, td in zip(times[num], times[den]))
        q = statistics.quantiles(r, n=4) if len(r) >= 4 else [r[0], statistics.median(r), r[-1]]
        return {"median": statistics.median(r), "q1": q[0], "q3": q[2]}

    ratios = {}
    for lay in layouts:
        ratios[f"zeroadamw_fused vs torch_fused ({lay})"] = paired(f"zeroadamw_fused/{lay}", f"torch_fused/{lay}")
        ratios[f"zeroadamw_foreach vs torch_foreach ({lay})"] = paired(f"zeroadamw_foreach/{lay}", f"torch_foreach/{lay}")
        ratios[f"zeroadamw_fused vs torch_foreach ({lay})"] = paired(f"zeroadamw_fused/{lay}", f"torch_foreach/{lay}")
    targets = []
    for lay in layouts:
        r = ratios[f"zeroadamw_fused vs torch_fused ({lay})"]
        ok = r["median"] >= 1.0
        targets.append({"target": f"kernel_vs_torch_fused_{lay}", "pass": ok,
                        "text": f"update kernel ({lay}, {n_of[lay] / 1e6:.3g}M params): zeroadamw fused throughput = "
                                f"{r['median']:.3f}x torch fused AdamW's (paired median, IQR {r['q1']:.3f}-{r['q3']:.3f}; "
                                f"target >= 1.0{'; 1.0 lies inside the IQR: equal within the trial-to-trial spread' if r['q1'] <= 1.0 <= r['q3'] else ''}); "
                                f"{gbps[f'zeroadamw_fused/{lay}']:.1f} GB/s = "
                                f"{gbps[f'zeroadamw_fused/{lay}'] / bw:.0%} of the measured {bw:.1f} GB/s"})
    threads = torch.get_num_threads() if device.type == "cpu" else None
    mach = (f"{platform.machine()}, {os.cpu_count()} CPU cores ({threads} torch threads), torch {torch.__version__}, "
            f"{device}" + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""))
    res = {
        "when": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": "python benchmarks/kernel_bandwidth.py" + (" " + " ".join(sys.argv[1:]) if sys.argv[1:] else ""),
        "machine": mach, "device": device.type, "trials": args.trials, "params": n_of,
        "tensors": {k: len(v) for k, v in layouts.items()}, "bytes_per_param": BYTES_PER_PARAM,
        "median_ms": {k: v * 1e3 for k, v in med.items()}, "GBps": gbps,
        "bandwidth_GBps": {"copy": gbps["copy"], "triad": gbps["triad"], "used": bw},
        "fraction_of_bandwidth": {k: gbps[k] / bw for k in runners if "/" in k},
        "ratios": ratios, "targets": targets,
    }
    lines = [
        "## Update kernel vs torch AdamW vs memory bandwidth", "",
        f"`{res['command']}` on {mach}; {args.trials} paired trials, medians ({res['when']}).", "",
        f"Memory bandwidth measured in the same run: copy {gbps['copy']:.1f} GB/s, triad {gbps['triad']:.1f} GB/s "
        f"({nb / 1e6:.1f}M-element fp32 arrays). An fp32 AdamW step moves {BYTES_PER_PARAM} B/param; "
        "effective GB/s = 28 x params / median time; fraction = of the better of copy and triad.", "",
        "| kernel | layout | tensors | median ms | effective GB/s | fraction of bandwidth |",
        "|---|---|---|---|---|---|",
    ]
    for lay in layouts:
        for k in kernels:
            key = f"{k}/{lay}"
            lines.append(f"| {k.replace('_', ' ')} | {lay} ({n_of[lay] / 1e6:.3g}M) | {len(layouts[lay])} | "
                         f"{med[key] * 1e3:.2f} | {gbps[key]:.1f} | {gbps[key] / bw:.0%} |")
    if any(gbps[f"{k}/{lay}"] > bw for lay in layouts for k in kernels):
        lines += ["", NOTE_ABOVE_100]
    lines += ["", "Paired throughput ratios (median over trials, IQR):", ""]
    lines += [f"- {k}: {v['median']:.3f}x ({v['q1']:.3f}-{v['q3']:.3f})" for k, v in ratios.items()]
    lines += ["", "Targets:", ""] + [f"- **{'PASS' if t['pass'] else 'MISS'}** {t['text']}" for t in targets]
    md = "\n".join(lines) + "\n"
    print(md)
    for path, text in ((args.json, json.dumps(res, indent=2)), (args.md, md)):
        if path:
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            with open(path, "w") as f:
                f.write(text + ("\n" if not text.endswith("\n") else ""))


if __name__ == "__main__":
    main()
