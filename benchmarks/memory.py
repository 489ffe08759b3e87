"""Per-rank memory and step time at N = 1, 2, 4 ranks: ShardedAdamW stage 1 / 2 vs DDP + torch AdamW.

    python benchmarks/memory.py [--world-sizes 1 2 4] [--steps 12] [--d-model 512 --layers 4]
                                [--out benchmarks/results/memory]

Every (mode, N) runs in fresh processes (torchrun; gloo on CPU, NCCL on GPUs) that build the same byte-level
transformer LM (zeroadamw.demo.TinyLM), reset the peak-memory counter after the model is built (VmHWM via
/proc/self/clear_refs, or CUDA's allocator peak), train ``--steps`` steps on their own batches, and report per
rank: optimizer-state bytes, the peak memory growth over the model-built baseline, the median step time
(forward + backward + step), collective bytes per step, and the final loss.

On CPU the workers run with ``MALLOC_MMAP_THRESHOLD_=131072`` (``--glibc-default`` to turn it off): glibc's
dynamic threshold otherwise keeps freed large blocks in the heap, and VmHWM then measures allocator retention
rather than what each optimizer holds (measured: +50 to +130 MiB noise per rank on the default model).

Modes: ``ddp_adamw`` (DDP + torch.optim.AdamW fused; one process: plain AdamW), ``zero_redundancy``
(DDP + torch.distributed.optim.ZeroRedundancyOptimizer(AdamW)), ``stage1``, ``ddp_stage1`` (DDP + stage 1 with
grads_reduced=True), ``stage2``. Output: ``<out>.jsonl`` (one record per rank) and ``<out>.md`` (a table with
the ratios measured in this run).
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

MODES = ["ddp_adamw", "zero_redundancy", "stage1", "ddp_stage1", "stage2"]


def worker(args) -> None:
    import torch
    import torch.distributed as dist
    from torch import nn

    from zeroadamw import ShardedAdamW
    from zeroadamw.demo import TinyLM, decay_groups
    from zeroadamw.memory import adamw_state_bytes, current_rss_bytes, peak_memory_bytes, reset_peak_memory

    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available() and not args.cpu
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1:
        dist.init_process_group("nccl" if cuda else "gloo")
    rank = dist.get_rank() if world > 1 else 0
    torch.manual_seed(0)
    model = TinyLM(args.d_model, args.layers, seq_len=args.seq_len).to(device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    n_params = sum(p.numel() for p in trainable)
    fwd_model = model
    mode = args.mode
    if mode in ("ddp_adamw", "zero_redundancy", "ddp_stage1") and world > 1:
        fwd_model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if cuda else None)
    comm_bytes = None
    if mode == "ddp_adamw":
        opt = torch.optim.AdamW(decay_groups(model, 0.1), lr=1e-3, fused=True)
    elif mode == "zero_redundancy":
        if world == 1:
            opt = torch.optim.AdamW(decay_groups(model, 0.1), lr=1e-3, fused=True)
        else:
            from torch.distributed.optim import ZeroRedundancyOptimizer

            opt = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=torch.optim.AdamW, lr=1e-3,
                                          weight_decay=0.1, fused=True)
    else:
        opt = ShardedAdamW(decay_groups(model, 0.1), lr=1e-3, stage=1 if "stage1" in mode else 2,
                           grads_reduced=(mode == "ddp_stage1" and world > 1), bucket_size=args.bucket_size)
    # DDP's own traffic (when it is used): 2 (N-1)/N x the gradient bytes it all-reduces per step
    ddp_bytes = 2 * (world - 1) / world * n_params * 4 if fwd_model is not model else 0

    def batch(step):
        g = torch.Generator().manual_seed(step * 1000 + rank)
        x = torch.randint(0, 256, (args.batch, args.seq_len + 1), generator=g).to(device)
        return x[:, :-1], x[:, 1:]

    baseline = current_rss_bytes() if not cuda else torch.cuda.memory_allocated(device)
    reset_peak_memory(device)
    times = []
    for step in range(args.steps):
        if cuda:
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        x, y = batch(step)
        loss = nn.functional.cross_entropy(fwd_model(x).flatten(0, 1), y.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
        if step == 0 and isinstance(opt, ShardedAdamW):
            opt.reset_comm_counters()
    peak = peak_memory_bytes(device)
    if isinstance(opt, ShardedAdamW):
        state_bytes = opt.state_bytes()
        comm_bytes = sum(v["bytes"] for v in opt.comm_counters().values()) / (args.steps - 1) + ddp_bytes
    elif mode == "zero_redundancy" and world > 1:
        local = opt.optim.state
        state_bytes = sum(t.numel() * t.element_size() for st in local.values() for k, t in st.items()
                          if torch.is_tensor(t) and k != "step")
        comm_bytes = ddp_bytes + (world - 1) / world * n_params * 4  # + its param broadcast, ~ an all-gather
    else:
        state_bytes = sum(t.numel() * t.element_size() for st in opt.state.values() for k, t in st.items()
                          if torch.is_tensor(t) and k != "step")
        comm_bytes = ddp_bytes
    rec = {
        "mode": mode, "world_size": world, "rank": rank, "device": device.type, "params": n_params,
        "state_bytes": state_bytes, "adamw_state_bytes": adamw_state_bytes(trainable),
        "peak_growth_bytes": peak - baseline, "peak_bytes": peak,
        "step_ms_median": statistics.median(times[1:]) * 1e3,
        "comm_bytes_per_step": comm_bytes, "final_loss": loss.item(),
    }
    with open(os.path.join(args.result_dir, f"{mode}-{world}-{rank}.json"), "w") as f:
        json.dump(rec, f)
    if world > 1:
        dist.destroy_process_group()


def launch(mode: str, world: int, args, result_dir: str) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
           os.path.abspath(__file__), "--worker", "--mode", mode, "--result-dir", result_dir,
           "--steps", str(args.steps), "--d-model", str(args.d_model), "--layers", str(args.layers),
           "--seq-len", str(args.seq_len), "--batch", str(args.batch), "--bucket-size", str(args.bucket_size)]
    if args.cpu:
        cmd.append("--cpu")
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // world)))
    if not args.glibc_default:
        # glibc raises its mmap threshold after large frees and then keeps freed heap memory: VmHWM would then
        # measure the allocator's retention policy (which penalises whoever frees and reallocates most) instead
        # of what each optimizer holds. A fixed threshold returns large blocks to the OS at free().
        env.setdefault("MALLOC_MMAP_THRESHOLD_", "131072")
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def table(records: list[dict]) -> str:
    mib = 2**20
    by = {(r["mode"], r["world_size"]): [] for r in records}
    for r in records:
        by[(r["mode"], r["world_size"])].append(r)
    lines = ["| mode | N | state MiB/rank | state / AdamW's | peak growth MiB/rank | step ms | comm MB/step/rank | final loss |",
             "|---|---|---|---|---|---|---|---|"]
    for (mode, n), rs in sorted(by.items(), key=lambda kv: (kv[0][1], MODES.index(kv[0][0]))):
        st = max(r["state_bytes"] for r in rs)
        lines.append(
            f"| {mode} | {n} | {st / mib:.2f} | {st / rs[0]['adamw_state_bytes']:.3f} | "
            f"{max(r['peak_growth_bytes'] for r in rs) / mib:.1f} | {max(r['step_ms_median'] for r in rs):.0f} | "
            f"{rs[0]['comm_bytes_per_step'] / 1e6:.1f} | {rs[0]['final_loss']:.3f} |")
    return "\n".join(lines)


def summary(records: list[dict]) -> str:
    """The targets, as ratios measured in this run."""
    def get(mode, n, key):
        rs = [r for r in records if r["mode"] == mode and r["world_size"] == n]
        return max(r[key] for r in rs) if rs else None

    out = []
    for n in sorted({r["world_size"] for r in records}):
        if n == 1:
            continue
        for mode in ("stage1", "stage2"):
            st, ref = get(mode, n, "state_bytes"), get("ddp_adamw", n, "state_bytes")
            if st is not None and ref:
                out.append(f"- N={n} {mode}: optimizer state per rank = {st / ref:.4f} x AdamW's (target 1/{n} = {1 / n:.4f}, + padding)")
        p2, pd = get("stage2", n, "peak_growth_bytes"), get("ddp_adamw", n, "peak_growth_bytes")
        params = records[0]["params"]
        if p2 is not None and pd is not None:
            # theoretical saving of stage 2 vs DDP (fp32): grads 4(1-1/N) + Adam state 8(1-1/N) bytes per param
            theory = params * 12 * (1 - 1 / n)
            out.append(f"- N={n} stage2 peak growth {p2 / 2**20:.1f} MiB vs DDP+AdamW {pd / 2**20:.1f} MiB: saved "
                       f"{(pd - p2) / 2**20:.1f} MiB = {(pd - p2) / theory:.0%} of the theoretical {theory / 2**20:.1f} MiB "
                       "(target >= 90%)")
        t2, td = get("stage2", n, "step_ms_median"), get("ddp_adamw", n, "step_ms_median")
        if t2 and td:
            out.append(f"- N={n} stage2 step time = {t2 / td:.2f} x DDP+AdamW's (target <= 1.1)")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--mode", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--result-dir", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--modes", nargs="+", default=MODES, choices=MODES)
    ap.add_argument("--world-sizes", nargs="+", type=int, default=[1, 2, 4])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--d-model", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--bucket-size", type=int, default=2**20)
    ap.add_argument("--cpu", action="store_true", help="stay on CPU/gloo even when CUDA is available")
    ap.add_argument("--glibc-default", action="store_true",
                    help="keep glibc's dynamic mmap threshold (by default workers run with MALLOC_MMAP_THRESHOLD_=131072)")
    ap.add_argument("--out", default="benchmarks/results/memory")
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.world_sizes:
            for mode in args.modes:
                if n == 1 and mode in ("zero_redundancy", "ddp_stage1"):
                    continue  # the same as ddp_adamw / stage1 in one process
                t0 = time.time()
                launch(mode, n, args, tmp)
                print(f"ran {mode} N={n} in {time.time() - t0:.0f}s", flush=True)
        for name in sorted(os.listdir(tmp)):
            with open(os.path.join(tmp, name)) as f:
                records.append(json.load(f))
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out + ".jsonl", "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    import platform

    import torch

    head = (f"Measured with `python benchmarks/memory.py {' '.join(sys.argv[1:])}`{' (MALLOC_MMAP_THRESHOLD_=131072)' if not args.glibc_default else ''} on {platform.machine()}, "
            f"{os.cpu_count()} CPU cores, torch {torch.__version__}, {records[0]['device']}; model "
            f"{records[0]['params'] / 1e6:.1f}M fp32 params; {args.steps} steps, medians over steps 2..{args.steps}.")
    md = head + "\n\n" + table(records) + "\n\n" + summary(records) + "\n"
    with open(args.out + ".md", "w") as f:
        f.write(md)
    print(md)


if __name__ == "__main__":
    main()
