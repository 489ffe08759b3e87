"""Our optimizers on an FSDP2 model: plain optimizers on the DTensor shards (README example).

    torchrun --standalone --nproc_per_node 2 examples/fsdp2.py

FSDP2 (``fully_shard``) already shards params, gradients and so the state: ShardedAdamW sees DTensor params and
runs the plain AdamW step on the local shards -- no second sharding -- with its decay modes, precision-aware state,
clipping and non-finite skip over FSDP2's mesh. Checks it against torch.optim.AdamW on an identical model.
"""
import os
import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard

from zeroadamw import ShardedAdamW

if "RANK" not in os.environ:
    sys.exit("launch with torchrun (see the docstring)")
dist.init_process_group("cuda:nccl,cpu:gloo" if torch.cuda.is_available() else "gloo")
device = "cuda" if torch.cuda.is_available() else "cpu"
if device == "cuda":
    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
rank = dist.get_rank()


def build():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 64)).to(device)
    for layer in (model[0], model[2]):
        fully_shard(layer)
    fully_shard(model)
    return model


# [readme:start]
model = build()                                      # fully_shard(...) on its layers and the root
opt = ShardedAdamW(model.parameters(), lr=1e-3, weight_decay=0.1, max_grad_norm=1.0)
# [readme:end]
ref_model = build()
ref = torch.optim.AdamW(ref_model.parameters(), lr=1e-3, weight_decay=0.1, fused=True)
for step in range(5):
    x = torch.randn(16, 64, device=device, generator=torch.Generator(device).manual_seed(100 * step + rank))
    for m, o in ((model, opt), (ref_model, ref)):
        m(x).square().mean().backward()
        if o is ref:
            torch.nn.utils.clip_grad_norm_(ref_model.parameters(), 1.0)
        o.step()
        o.zero_grad()
same = all(torch.equal(p.to_local(), q.to_local()) for p, q in zip(model.parameters(), ref_model.parameters()))
kinds = {type(v).__name__ for st in opt.state.values() for k, v in st.items() if k != "step"}
if rank == 0:
    print(f"grad_norm {opt.grad_norm:.4f}; state held as {sorted(kinds)}; equal to torch.optim.AdamW: {same}")
dist.barrier()  # every rank done with the mesh's groups before they go
dist.destroy_process_group()
