"""Accelerate with ShardedAdamW: accumulate, clip, step, save_state (README example).

    python examples/accelerate_loop.py [DIR]
    accelerate launch --num_processes 2 examples/accelerate_loop.py [DIR]   # on CPU: ACCELERATE_USE_CPU=true
"""
import os
import sys

import torch
from accelerate import Accelerator
from transformers import LlamaConfig, LlamaForCausalLM

from zeroadamw import ShardedAdamW

out = sys.argv[1] if len(sys.argv) > 1 else "out/accelerate_example"
torch.manual_seed(0)
model = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))
starts = torch.randint(0, 128, (64, 1), generator=torch.Generator().manual_seed(1))
ds = [{"input_ids": x, "labels": x} for x in (starts + torch.arange(32)) % 128]
loader = torch.utils.data.DataLoader(ds, batch_size=4)

# [readme:start]
from zeroadamw.integrations.accelerate import prepare

accelerator = Accelerator(gradient_accumulation_steps=2, cpu=not torch.cuda.is_available())
opt = ShardedAdamW(model.parameters(), lr=3e-3, weight_decay=0.1, stage=2)
sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 3))   # warm-up
model, opt, loader, sched = prepare(accelerator, model, opt, loader, sched)       # no DDP wrapping
for batch in loader:
    with accelerator.accumulate(model):           # no_sync() on the non-final micro-batches -> the optimizer's
        loss = model(**batch).loss
        accelerator.backward(loss)
        norm = accelerator.clip_grad_norm_(model.parameters(), 1.0)   # -> exact global-norm clipping in step()
        opt.step()
        sched.step()
        opt.zero_grad()
    if accelerator.sync_gradients:                # norm: the pre-clip global norm, filled by step()
        accelerator.print(f"loss {loss.item():.3f}  grad_norm {norm.item():.3f}")
accelerator.save_state(os.path.join(out, "state"))  # consolidated optimizer state; load_state resumes
# [readme:end]
accelerator.print("saved", os.path.join(out, "state"))
