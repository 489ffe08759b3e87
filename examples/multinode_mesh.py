"""Hierarchical sharding: shard inside a node, replicate across nodes (README example).

    torchrun --nnodes 2 --nproc_per_node 8 ... examples/multinode_mesh.py      # 2 nodes x 8 GPUs: a 2 x 8 mesh
    torchrun --standalone --nproc_per_node 4 examples/multinode_mesh.py 2     # one machine: pretend 2 per node

Prints the state each rank holds (AdamW's / ranks per node) and the bytes one step sent per mesh dimension,
next to the communication model's (zeroadamw.estimate.comm_bytes): they are equal.
"""
import os
import sys

import torch
import torch.distributed as dist
from torch import nn

from zeroadamw import ShardedAdamW, mesh_from_env
from zeroadamw.estimate import comm_bytes

if "RANK" not in os.environ:
    sys.exit("launch with torchrun (see the docstring)")
dist.init_process_group("cuda:nccl,cpu:gloo" if torch.cuda.is_available() else "gloo")
if torch.cuda.is_available():
    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
device = "cuda" if torch.cuda.is_available() else "cpu"
rank = dist.get_rank()
# [readme:start]
shard_size = int(sys.argv[1]) if len(sys.argv) > 1 else None  # default: LOCAL_WORLD_SIZE, the GPUs of a node
mesh = mesh_from_env(shard_size=shard_size)                     # ("replicate", "shard") = (nodes, GPUs per node)
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 64)).to(device)
opt = ShardedAdamW(model.parameters(), lr=1e-3, stage=2, device_mesh=mesh, bucket_size=8192)

for step in range(5):
    if step == 4:
        opt.reset_comm_counters()                               # count one steady-state step
    x = torch.randn(32, 64, device=device, generator=torch.Generator(device).manual_seed(100 * step + rank))
    model(x).square().mean().backward()                         # per bucket: reduce-scatter over "shard",
    opt.step()                                                  # all-reduce over "replicate"; update; all-gather
    opt.zero_grad()

R, S = mesh.shape
psi = sum(p.numel() for p in model.parameters())
counted = {dim: {op: v["bytes"] for op, v in ops.items()} for dim, ops in opt.comm_counters(by_dim=True).items()}
model_bytes = comm_bytes([(b.layout.padded, b.reduce_dtype.itemsize, b.dtype.itemsize) for b in opt.engine.buckets],
                         shard=S, replicate=R)
# [readme:end]
if rank == 0:
    print(f"mesh {R} x {S}: state on this rank {opt.state_bytes()} bytes, AdamW's {8 * psi} / {S} = {8 * psi // S}")
    for dim in ("shard", "replicate"):
        print(f"{dim}: counted {counted[dim]}, model {model_bytes[dim]}, equal: {counted[dim] == model_bytes[dim]}")
params = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
first = params.clone()
dist.broadcast(first, 0)
if rank == 0:
    print(f"every rank holds the same weights: {bool(torch.equal(params, first))}")
dist.barrier()  # every rank done with the mesh's groups before they go
dist.destroy_process_group()
