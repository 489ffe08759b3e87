"""PEFT / LoRA with ShardedAdamW: only the adapters are bucketed, sharded and given optimizer state (README example).

    python examples/peft_lora.py          # or: torchrun --nproc_per_node 2 examples/peft_lora.py
"""
import os

import torch
import torch.distributed as dist
from transformers import LlamaConfig, LlamaForCausalLM

from zeroadamw import ShardedAdamW

if "RANK" in os.environ:  # launched by torchrun
    dist.init_process_group("gloo")
torch.manual_seed(0)
model = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))
starts = torch.randint(0, 128, (32, 1), generator=torch.Generator().manual_seed(1))
batches = [{"input_ids": x, "labels": x} for x in ((starts + torch.arange(32)) % 128).split(4)]

# [readme:start]
from peft import LoraConfig, get_peft_model

model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
opt = ShardedAdamW(model.parameters(), lr=1e-2, stage=2)   # frozen base params: never bucketed, no state
for batch in batches:
    model(**batch).loss.backward()
    opt.step()
    opt.zero_grad()
adapters = sum(p.numel() for p in model.parameters() if p.requires_grad)
print(f"{adapters:,} adapter params of {sum(p.numel() for p in model.parameters()):,}; optimizer state on this "
      f"rank {opt.state_bytes():,} bytes (8 per adapter element / world size, + padding)")
# [readme:end]
if dist.is_initialized():
    dist.destroy_process_group()
