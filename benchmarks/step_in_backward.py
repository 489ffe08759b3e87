"""Peak memory and step time of step-in-backward vs the usual paths, tiny Llama, N = 1 and 2.

    python benchmarks/step_in_backward.py [--world-sizes 1 2] [--steps 8] [--hidden 512 --layers 8 --vocab 8000]
                                          [--out benchmarks/results/step_in_backward]

Each (mode, N) runs in fresh processes (torchrun; gloo on CPU). The model is a LlamaForCausalLM built from a
LlamaConfig (no download), fp32. Per rank: the growth of peak RSS (VmHWM, reset after the model is built; glibc's
mmap threshold fixed as in memory.py) over a few training steps, and the median step time (forward + backward +
step). Modes:

* ``torch_adamw`` -- torch.optim.AdamW(fused=True) (+ DDP at N > 1): holds every gradient until step();
* ``stage2`` -- ShardedAdamW stage 2: reduce-scatters in backward, holds the 1/N reduced shard until step();
* ``sib`` -- ShardedAdamW(step_in_backward=True): updates each bucket during backward, holds ~2 buckets;
* ``sib_clip`` -- the same with max_grad_norm=1.0 (exact clipping holds the reduced 1/N shard until step());
* ``lomo`` -- lomo_optim.Lomo (N = 1 only; its SGD update runs in backward hooks; no Adam state at all).

Activation checkpointing is on by default (HF's, use_reentrant=False) -- the setting memory-constrained
fine-tuning uses; without it (``--no-grad-ckpt``) activations dominate the peak and dropping gradients saves
much less (measured and reported too).

Target (issue): sib's peak <= torch AdamW's peak - 0.9 x the gradient bytes it avoids, and its step time within
1.1x of the non-fused path (stage2).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

MODES = ["torch_adamw", "stage2", "sib", "sib_clip", "lomo"]


def worker(args) -> None:
    import torch
    import torch.distributed as dist
    from transformers import LlamaConfig, LlamaForCausalLM

    from zeroadamw import ShardedAdamW
    from zeroadamw.memory import current_rss_bytes, peak_memory_bytes, reset_peak_memory

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if world > 1 else 0
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=int(args.hidden * 2.75),
                      num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=8,
                      max_position_embeddings=args.seq, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    if args.grad_ckpt:  # the memory-constrained fine-tuning setting (LOMO's too): activations no longer dominate
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    fwd = model
    mode = args.mode
    lomo = None
    if mode == "torch_adamw":
        if world > 1:
            fwd = torch.nn.parallel.DistributedDataParallel(model)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    elif mode == "lomo":
        from lomo_optim import Lomo

        lomo = Lomo(model, lr=1e-4)
        opt = None
    else:
        opt = ShardedAdamW(model.parameters(), lr=1e-4, bucket_size=args.bucket_size,
                           step_in_backward=mode.startswith("sib"),
                           max_grad_norm=1.0 if mode == "sib_clip" else None)

    def batch(step):
        g = torch.Generator().manual_seed(step * 100 + rank)
        return torch.randint(0, args.vocab, (args.batch, args.seq), generator=g)

    import gc

    gc.collect()
    base = current_rss_bytes()
    reset_peak_memory()
    times = []
    for step in range(args.steps):
        if step == 1:  # from here on the optimizer state exists: the steady-state peak
            first = peak_memory_bytes() - base
            reset_peak_memory()
        t0 = time.perf_counter()
        ids = batch(step)
        loss = fwd(input_ids=ids, labels=ids).loss
        if lomo is not None:
            lomo.fused_backward(loss, 1e-4)
        else:
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    rec = {"mode": mode, "world_size": world, "rank": rank, "params": n_params,
           "grad_bytes": n_params * 4, "peak_growth_bytes": max(first, peak_memory_bytes() - base),
           "steady_peak_growth_bytes": peak_memory_bytes() - base,
           "step_ms_median": statistics.median(times[1:]) * 1e3, "final_loss": loss.item()}
    with open(os.path.join(args.result_dir, f"{mode}-{world}-{rank}.json"), "w") as f:
        json.dump(rec, f)
    if world > 1:
        dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--mode", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--result-dir", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--modes", nargs="+", default=MODES, choices=MODES)
    ap.add_argument("--world-sizes", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=8000)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--bucket-size", type=int, default=2**21)
    ap.add_argument("--no-grad-ckpt", dest="grad_ckpt", action="store_false",
                    help="turn off activation checkpointing (on by default, use_reentrant=False)")
    ap.add_argument("--out", default="benchmarks/results/step_in_backward")
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.world_sizes:
            for mode in args.modes:
                if mode == "lomo" and n > 1:
                    continue  # lomo_optim under torchrun does not keep ranks in sync (no gradient reduction)
                cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
                       os.path.abspath(__file__), "--worker", "--mode", mode, "--result-dir", tmp,
                       "--steps", str(args.steps), "--hidden", str(args.hidden), "--layers", str(args.layers),
                       "--vocab", str(args.vocab), "--seq", str(args.seq), "--batch", str(args.batch),
                       "--bucket-size", str(args.bucket_size)] + ([] if args.grad_ckpt else ["--no-grad-ckpt"])
                env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // n)),
                           MALLOC_MMAP_THRESHOLD_="131072")
                t0 = time.time()
                subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                print(f"ran {mode} N={n} in {time.time() - t0:.0f}s", flush=True)
        for name in sorted(os.listdir(tmp)):
            with open(os.path.join(tmp, name)) as f:
                records.append(json.load(f))
    mib = 2**20
    grad_mib = records[0]["grad_bytes"] / mib
    lines = [f"Measured with `python benchmarks/step_in_backward.py {' '.join(sys.argv[1:])}` (MALLOC_MMAP_THRESHOLD_=131072): "
             f"LlamaForCausalLM {records[0]['params'] / 1e6:.1f}M fp32 params (gradients {grad_mib:.0f} MiB), "
             f"{os.cpu_count()} CPU cores, gloo; activation checkpointing {'on' if args.grad_ckpt else 'off'}; "
             f"{args.steps} steps, medians over steps 2..{args.steps}.", "",
             "| mode | N | peak growth MiB/rank (all steps) | steady-state peak growth MiB/rank (steps 2..) | step ms | final loss |",
             "|---|---|---|---|---|---|"]
    by = {}
    for r in records:
        by.setdefault((r["mode"], r["world_size"]), []).append(r)
    for (mode, n), rs in sorted(by.items(), key=lambda kv: (kv[0][1], MODES.index(kv[0][0]))):
        lines.append(f"| {mode} | {n} | {max(r['peak_growth_bytes'] for r in rs) / mib:.1f} | "
                     f"{max(r['steady_peak_growth_bytes'] for r in rs) / mib:.1f} | "
                     f"{max(r['step_ms_median'] for r in rs):.0f} | {rs[0]['final_loss']:.3f} |")
    lines.append("")

    def get(mode, n, key):
        rs = by.get((mode, n))
        return None if not rs else max(r[key] for r in rs)

    for n in args.world_sizes:
        t, s, s2 = (get("torch_adamw", n, "steady_peak_growth_bytes"), get("sib", n, "steady_peak_growth_bytes"),
                    get("stage2", n, "steady_peak_growth_bytes"))
        # gradient bytes sib avoids vs torch: all of them at N = 1; at N > 1 also DDP's bucket copy
        avoided = records[0]["grad_bytes"] * (1 if n == 1 else 2)
        if t is not None and s is not None:
            lines.append(f"- N={n}: sib steady-state peak {s / mib:.1f} MiB vs torch AdamW {t / mib:.1f} MiB: saved {(t - s) / mib:.1f} MiB "
                         f"= {(t - s) / avoided:.0%} of the {avoided / mib:.0f} MiB of gradients it avoids (target >= 90%)")
        ts, t2 = get("sib", n, "step_ms_median"), get("stage2", n, "step_ms_median")
        if ts and t2:
            lines.append(f"- N={n}: sib step time = {ts / t2:.2f} x stage 2's (target <= 1.1); stage 2 peak {s2 / mib:.1f} MiB")
    md = "\n".join(lines) + "\n"
    print(md)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out + ".md", "w") as f:
        f.write(md)
    with open(args.out + ".jsonl", "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
