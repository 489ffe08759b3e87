"""Peak memory of zeroadamw.checkpoint: save / load at N ranks and the offline export, against the state size.

    python benchmarks/checkpoint_memory.py [--layers 24] [--width 1024] [--world-size 2] [--out benchmarks/results/checkpoint_memory]

A stack of ``--layers`` Linear(width, width) layers (24 x 1024^2 = 25.2M fp32 params: 96 MiB of weights, 192 MiB
of Adam state). Each phase runs in fresh processes and reports the growth of VmHWM over the RSS just before the
phase (glibc's fixed mmap threshold, as in memory.py): save and load with ShardedAdamW stage 2 on N gloo ranks
(per rank), and ``export_consolidated`` in one process. Bounded memory means the growth tracks one parameter
(4 MiB here), not the state.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

WORKER = r"""
import json, os, sys, torch, torch.distributed as dist, gc
from zeroadamw import ShardedAdamW, checkpoint as ck
from zeroadamw.memory import reset_peak_memory, peak_memory_bytes, current_rss_bytes
phase, root, layers, width = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
if distributed:
    dist.init_process_group("gloo")
rank = dist.get_rank() if distributed else 0
res = {}
if phase in ("save", "load"):
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width, bias=False) for _ in range(layers)])
    opt = ShardedAdamW(model.parameters(), stage=2)
    model(torch.randn(2, width)).sum().backward(); opt.step(); opt.zero_grad()
    gc.collect()
    base = current_rss_bytes(); reset_peak_memory()
    if phase == "save":
        ck.save(root + "/c", model=model, optimizer=opt)
    else:
        ck.load(root + "/c", model=model, optimizer=opt)
    res = {"phase": phase, "rank": rank, "growth": peak_memory_bytes() - base, "state_bytes_rank": opt.state_bytes()}
else:
    base = current_rss_bytes(); reset_peak_memory()
    ck.export_consolidated(root + "/c", root + "/out")
    res = {"phase": "export", "rank": 0, "growth": peak_memory_bytes() - base,
           "file_bytes": os.path.getsize(root + "/out/optimizer.pt") + os.path.getsize(root + "/out/model.safetensors")}
print("RESULT " + json.dumps(res), flush=True)
if distributed:
    dist.destroy_process_group()
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--world-size", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/results/checkpoint_memory")
    args = ap.parse_args()
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", OMP_NUM_THREADS="1")
    params = args.layers * args.width * args.width
    rows = []
    with tempfile.TemporaryDirectory() as root:
        script = os.path.join(root, "worker.py")
        with open(script, "w") as f:
            f.write(WORKER)
        for phase in ("save", "load", "export"):
            if phase == "export":
                cmd = [sys.executable, script, phase, root, str(args.layers), str(args.width)]
            else:
                cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                       f"--nproc_per_node={args.world_size}", script, phase, root, str(args.layers), str(args.width)]
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
            rows += [json.loads(line.split("RESULT ", 1)[1]) for line in out.splitlines() if "RESULT " in line]
    mib = 2**20
    state = params * 8
    lines = [
        f"Measured with `python benchmarks/checkpoint_memory.py {' '.join(sys.argv[1:])}`: {params / 1e6:.1f}M fp32 "
        f"params in {args.layers} tensors of {args.width * args.width * 4 / mib:.0f} MiB; Adam state {state / mib:.0f} MiB "
        f"in all; save/load on {args.world_size} gloo ranks (stage 2), export in one process.",
        "",
        "| phase | rank | peak growth MiB | vs full Adam state |",
        "|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['phase']} | {r['rank']} | {r['growth'] / mib:.1f} | {r['growth'] / state:.3f} |")
    md = "\n".join(lines) + "\n"
    print(md)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out + ".md", "w") as f:
        f.write(md)
    with open(args.out + ".json", "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
