"""Diagnostics in a plain loop: per-group norms, update/weight ratio, effective decay -> JSONL -> PNG (README example).

    python examples/diagnostics_loop.py [DIR]     # or torchrun --nproc_per_node 2 ...: every rank logs, rank 0 writes
(With HF Trainer: ``attach(trainer)``, see examples/hf_trainer.py.)
"""
import os
import sys

import torch
import torch.distributed as dist
from torch import nn

from zeroadamw import ShardedAdamW

if "RANK" in os.environ:  # launched by torchrun
    dist.init_process_group("gloo")
rank = dist.get_rank() if dist.is_initialized() else 0
workdir = sys.argv[1] if len(sys.argv) > 1 else "out/diagnostics_example"  # where diag.jsonl and diag.png go
os.makedirs(workdir, exist_ok=True)
os.chdir(workdir)
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.LayerNorm(64), nn.Linear(64, 16))
opt = ShardedAdamW([{"params": [p for p in model.parameters() if p.ndim >= 2], "name": "decay"},
                    {"params": [p for p in model.parameters() if p.ndim < 2], "weight_decay": 0.0, "name": "no_decay"}],
                   lr=3e-3, weight_decay=0.1, max_grad_norm=1.0)

# [readme:start]
from zeroadamw.diagnostics import DiagnosticsLogger
from zeroadamw.plot import plot, read_log

log = DiagnosticsLogger(opt, "diag.jsonl", every=5)   # + tensorboard_dir="runs/x" (with tensorboard installed)
for step in range(40):                                # a plain loop, on every rank:
    x = torch.randn(8, 16)
    loss = nn.functional.mse_loss(model(x), x.flip(1))
    loss.backward()
    opt.step()
    log.log(step, loss=loss.item())                   # after opt.step(); rank 0 writes
    opt.zero_grad()
if rank == 0:
    plot(read_log("diag.jsonl"), "diag.png")          # = zeroadamw plot diag.jsonl -o diag.png
# [readme:end]
if rank == 0:
    print("wrote", os.path.abspath("diag.jsonl"), "and", os.path.abspath("diag.png"))
if dist.is_initialized():
    dist.destroy_process_group()
