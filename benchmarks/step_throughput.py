"""Optimizer step time, one process: ShardedAdamW vs torch.optim.AdamW (fused / foreach), paired A/B runs.

    python benchmarks/step_throughput.py [--params-m 16] [--trials 30] [--device cpu|cuda] [--json out.json]

Parameters: a LLaMA-style layer at hidden 1024 (q, k, v, o, gate, up, down, two norms) plus an embedding, ~16M
fp32 elements in realistic tensor sizes. Each trial times one ``step()`` of every contender, in a shuffled order,
on the same gradients; the reported ratio is the median over trials of (ours / torch fused) measured in the same
trial. Two comparisons:

* plain step: ShardedAdamW always computes the global gradient norm (it reports ``grad_norm`` and skips steps
  with inf/NaN gradients), one extra read of the gradients that torch's step does not do;
* step with clipping at 1.0: ``clip_grad_norm_`` + torch's step vs ShardedAdamW(max_grad_norm=1.0), which folds
  the clip coefficient into the fused update instead of rescaling the gradients in another pass.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import time

import torch

from zeroadamw import ShardedAdamW


def shapes(target_m: float, hidden: int = 1024, inter: int = 2816):
    layer = [(hidden, hidden)] * 4 + [(inter, hidden)] * 2 + [(hidden, inter)] + [(hidden,)] * 2
    per_layer = sum(torch.Size(s).numel() for s in layer)
    out = []
    total = 0
    while total + per_layer <= target_m * 1e6 * 0.85:
        out += layer
        total += per_layer
    rows = max(1, int((target_m * 1e6 - total) // hidden))
    out.insert(0, (rows, hidden))
    return out


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params-m", type=float, default=16.0)
    ap.add_argument("--trials", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    shp = shapes(args.params_m)
    base = [torch.randn(s, device=device) * 0.02 for s in shp]
    grads = [torch.randn(s, device=device) * 1e-3 for s in shp]
    n = sum(p.numel() for p in base)

    def make(kind):
        params = [torch.nn.Parameter(b.clone()) for b in base]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        if kind == "torch_fused":
            opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
        elif kind == "torch_foreach":
            opt = torch.optim.AdamW(params, lr=1e-4, foreach=True)
        elif kind == "torch_fused+clip":
            opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
            inner = opt.step

            def clipped():
                torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
                inner()

            return params, opt, clipped
        elif kind == "zeroadamw":
            opt = ShardedAdamW(params, lr=1e-4)
        elif kind == "zeroadamw+clip":
            opt = ShardedAdamW(params, lr=1e-4, max_grad_norm=1.0)
        else:
            raise ValueError(kind)
        return params, opt, opt.step

    kinds = ["zeroadamw", "torch_fused", "torch_foreach", "zeroadamw+clip", "torch_fused+clip"]
    runners = {k: make(k) for k in kinds}
    times = {k: [] for k in kinds}
    for trial in range(args.warmup + args.trials):
        order = kinds[:]
        random.Random(trial).shuffle(order)
        for k in order:
            params, _, step = runners[k]
            sync(device)
            t0 = time.perf_counter()
            step()
            sync(device)
            dt = time.perf_counter() - t0
            if trial >= args.warmup:
                times[k].append(dt)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    ratio = statistics.median(a / b for a, b in zip(times["zeroadamw"], times["torch_fused"]))
    ratio_clip = statistics.median(a / b for a, b in zip(times["zeroadamw+clip"], times["torch_fused+clip"]))
    ratio_foreach = statistics.median(a / b for a, b in zip(times["zeroadamw"], times["torch_foreach"]))
    # memory traffic of an AdamW step: read p, g, m, v; write p, m, v = 7 x 4 bytes per element (fp32)
    gbps = 28 * n / (med["torch_fused"] / 1e3) / 1e9
    res = {
        "machine": f"{platform.machine()} {torch.get_num_threads()} threads, torch {torch.__version__}, {device}",
        "params": n,
        "tensors": len(shp),
        "trials": args.trials,
        "median_ms": med,
        "ratio_vs_fused": ratio,
        "ratio_vs_foreach": ratio_foreach,
        "ratio_clip_vs_fused_clip": ratio_clip,
        "torch_fused_effective_GBps": gbps,
    }
    print(f"{n / 1e6:.1f}M fp32 params in {len(shp)} tensors, {args.trials} paired trials on {res['machine']}")
    print("| contender | median step ms |")
    print("|---|---|")
    for k in kinds:
        print(f"| {k} | {med[k]:.2f} |")
    print(f"\nzeroadamw / torch fused (plain step):          {ratio:.3f}x  (target <= 1.0)")
    print(f"zeroadamw / torch foreach (plain step):        {ratio_foreach:.3f}x")
    print(f"zeroadamw+clip / clip_grad_norm_+torch fused:  {ratio_clip:.3f}x")
    print(f"torch fused moves 28 B/param: {gbps:.1f} GB/s effective")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
