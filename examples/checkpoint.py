"""Reshardable checkpoints: save, load into a fresh job, continue, export (README example).

    python examples/checkpoint.py [DIR]        # or: torchrun --nproc_per_node 2 examples/checkpoint.py [DIR]

Checks what it claims: the resumed run ends with exactly the weights of a run that never stopped.
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
workdir = sys.argv[1] if len(sys.argv) > 1 else "out/checkpoint_example"  # where ckpt/ and export/ go
os.makedirs(workdir, exist_ok=True)
os.chdir(workdir)


def build():
    torch.manual_seed(0)  # the same model on every rank
    model = nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.LayerNorm(64), nn.Linear(64, 16))
    opt = ShardedAdamW(model.parameters(), lr=1e-2, weight_decay=0.1, stage=2, bucket_size=1000)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    return model, opt, sched


def train(model, opt, sched, steps, start=0):
    for step in range(start, start + steps):
        g = torch.Generator().manual_seed(100 * step + rank)  # each rank its own batch
        x = torch.randn(8, 16, generator=g)
        nn.functional.mse_loss(model(x), x.flip(1)).backward()
        opt.step()
        opt.zero_grad()
        sched.step()


# [readme:start]
from zeroadamw import checkpoint

model, opt, sched = build()
train(model, opt, sched, steps=3)
checkpoint.save("ckpt/step-3", model=model, optimizer=opt, scheduler=sched, extra={"step": 3})  # every rank

model, opt, sched = build()                                                            # a new job, any world size
extra = checkpoint.load("ckpt/step-3", model=model, optimizer=opt, scheduler=sched)    # every rank
train(model, opt, sched, steps=2, start=extra["step"])
if rank == 0:
    checkpoint.export_consolidated("ckpt/step-3", "export/")  # offline, 1 process: optimizer.pt + model.safetensors
# [readme:end]
ref, ref_opt, ref_sched = build()
train(ref, ref_opt, ref_sched, steps=5)  # the run that never stopped
same = all(torch.equal(a, b) for a, b in zip(model.parameters(), ref.parameters()))
if rank == 0:
    print(f"resumed from step {extra['step']}: weights after step 5 equal the uninterrupted run's: {same}")
    sd = torch.load("export/optimizer.pt", weights_only=True)
    print("export/: optimizer.pt (torch.optim.AdamW format, state of", len(sd["state"]), "params), model.safetensors")
if dist.is_initialized():
    dist.destroy_process_group()
