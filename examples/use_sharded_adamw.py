"""ShardedAdamW in a plain PyTorch training loop, with gradient accumulation (the README's "Use" example).

    torchrun --nproc_per_node 2 examples/use_sharded_adamw.py   # 2 processes: gloo on CPU, NCCL on GPUs
    python examples/use_sharded_adamw.py                        # 1 process: a plain AdamW, same code
"""
import contextlib
import os

import torch
import torch.distributed as dist
from transformers import LlamaConfig, LlamaForCausalLM

from zeroadamw import ShardedAdamW

if "RANK" in os.environ:  # launched by torchrun
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
rank = dist.get_rank() if dist.is_initialized() else 0
world = dist.get_world_size() if dist.is_initialized() else 1
device = torch.device("cpu")
if torch.cuda.is_available():
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    torch.cuda.set_device(device)

torch.manual_seed(0)  # every rank builds the same model (same seed)
config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
model = LlamaForCausalLM(config).to(device)

# a toy language to learn: each sequence counts up from a random start (mod 128); labels = input_ids
starts = torch.randint(0, 128, (128, 1), generator=torch.Generator().manual_seed(1))
dataset = [{"input_ids": x, "labels": x} for x in (starts + torch.arange(32)) % 128]
sampler = torch.utils.data.DistributedSampler(dataset, num_replicas=world, rank=rank, seed=0)  # a shard per rank
loader = torch.utils.data.DataLoader(dataset, batch_size=4, sampler=sampler, drop_last=True)
accum = 4  # micro-batches per optimizer step

decay = [p for p in model.parameters() if p.ndim >= 2]
no_decay = [p for p in model.parameters() if p.ndim < 2]  # norm weights (and biases): no weight decay
opt = ShardedAdamW(
    [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],  # or model.parameters()
    lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1,
    decay="decoupled",           # == torch.optim.AdamW; or "independent", "l2" (below)
    stage=2,                     # 1: shard optimizer state; 2: also shard gradients (reduce-scattered during backward)
    process_group=None,          # default group; no torch.distributed (or world size 1) = plain AdamW
    bucket_size=None,            # elements per bucket; None = about 1/32 of the model, 2**20..2**23
    master_dtype=torch.float32,  # fp32 master shard for bf16/fp16 params; None = update in the param dtype
    max_grad_norm=1.0,           # global-norm clipping over all shards; None = off
)
for i, batch in enumerate(loader):
    batch = {k: v.to(device) for k, v in batch.items()}
    last = (i + 1) % accum == 0                                 # gradient accumulation, as with DDP:
    with contextlib.nullcontext() if last else opt.no_sync():   # no communication on the other micro-batches
        loss = model(**batch).loss
        (loss / accum).backward()
    if last:
        opt.step()               # collective: every rank calls it
        opt.zero_grad()
        if rank == 0:            # grad_norm: global norm of the rank-averaged gradients, before clipping
            print(f"step {(i + 1) // accum:2d}  loss {loss.item():.3f}  grad_norm {opt.grad_norm:.3f}")
if rank == 0:
    print(f"done: {world} process(es), optimizer state on this rank {opt.state_bytes()} bytes")
if dist.is_initialized():
    dist.destroy_process_group()
