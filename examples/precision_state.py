"""Less state per parameter: int8 / bf16 moments and Kahan-compensated bf16 weights (README example).

    python examples/precision_state.py          # or: torchrun --nproc_per_node 2 examples/precision_state.py
"""
import os

import torch
import torch.distributed as dist
from transformers import LlamaConfig, LlamaForCausalLM

from zeroadamw import ShardedAdamW

if "RANK" in os.environ:  # launched by torchrun
    dist.init_process_group("gloo")
starts = torch.randint(0, 128, (32, 1), generator=torch.Generator().manual_seed(1))
ids = (starts + torch.arange(32)) % 128  # a toy language: counting mod 128
loader = [{"input_ids": x, "labels": x} for x in ids.split(4)]  # 8 batches of 4 sequences


def build_model(dtype):
    torch.manual_seed(0)  # the same initial weights for every variant
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).to(dtype)


# [readme:start]
variants = {  # (weights, optimizer options)
    "fp32 moments + fp32 master": (torch.bfloat16, {}),
    "int8 moments + fp32 master": (torch.bfloat16, dict(state_dtype="int8")),
    "bf16 moments + Kahan": (torch.bfloat16, dict(state_dtype="bf16", master_dtype=None, kahan_sum=True)),
    "int8 + Kahan, in backward": (torch.bfloat16, dict(state_dtype="int8", master_dtype=None, kahan_sum=True,
                                                       step_in_backward=True)),
}
for name, (dtype, kwargs) in variants.items():
    model = build_model(dtype)
    n = sum(p.numel() for p in model.parameters())
    opt = ShardedAdamW(model.parameters(), lr=3e-3, **kwargs)
    losses = []
    for batch in loader:
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    # every byte of state this rank holds: moments (codes + scales), master or compensation
    print(f"{name:27s} loss {losses[0]:.3f} -> {losses[-1]:.3f}  state {opt.state_bytes() / n:.2f} B/param")
# [readme:end]
if dist.is_initialized():
    dist.destroy_process_group()
