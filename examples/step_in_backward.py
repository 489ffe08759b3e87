"""Step in backward (LOMO-style): the four ShardedAdamW variants in the ordinary loop (README example).

    python examples/step_in_backward.py          # or: torchrun --nproc_per_node 2 examples/step_in_backward.py
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


def build_model():
    torch.manual_seed(0)  # the same initial weights for every variant (and on every rank)
    return LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))


# [readme:start]
variants = {
    "AdamW, fused into backward": dict(lr=3e-3, step_in_backward=True),
    "AdamW, exact clipping": dict(lr=3e-3, step_in_backward=True, max_grad_norm=1.0),
    "LOMO: SGD": dict(lr=3e-1, rule="lomo", step_in_backward=True),
    "AdaLomo": dict(lr=3e-2, rule="adalomo", step_in_backward=True),
}
for name, kwargs in variants.items():
    model = build_model()
    opt = ShardedAdamW(model.parameters(), **kwargs)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=len(loader))
    first = None
    for batch in loader:                      # the ordinary loop, unchanged
        loss = model(**batch).loss
        loss.backward()                       # buckets are reduced -- and, fused, updated -- as gradients appear
        opt.step()                            # finishes what backward started; reports grad_norm
        opt.zero_grad()
        sched.step()                          # schedulers work: every update reads param_groups
        first = loss.item() if first is None else first
    print(f"{name:27s} loss {first:.3f} -> {loss.item():.3f}  grad_norm {opt.grad_norm:.3f}")
# [readme:end]
if dist.is_initialized():
    dist.destroy_process_group()
