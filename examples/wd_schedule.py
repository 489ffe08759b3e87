"""Weight-decay schedules on top of the lr schedule (README example).

    python examples/wd_schedule.py
"""
import torch
from torch import nn

from zeroadamw import ShardedAdamW

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.LayerNorm(64), nn.Linear(64, 16))
matrices = [p for p in model.parameters() if p.ndim >= 2]
vectors = [p for p in model.parameters() if p.ndim < 2]  # biases and norm weights: a small decay of their own
total_steps = 20

# [readme:start]
groups = [{"params": matrices, "weight_decay": 0.1},                                      # the optimizer's schedule
          {"params": vectors, "weight_decay": 0.01, "wd_schedule": lambda t: 0.5 ** t}]   # its own: step -> multiplier
opt = ShardedAdamW(groups, lr=3e-4, weight_decay=0.1, wd_schedule="cosine", wd_schedule_steps=total_steps)
# wd_schedule: "cosine", "linear", "constant", or a callable step -> multiplier; per group as above
# [readme:end]
sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 5))  # lr warm-up: its own schedule
for step in range(total_steps):
    x = torch.randn(8, 16)
    nn.functional.mse_loss(model(x), x.flip(1)).backward()
    opt.step()
    opt.zero_grad()
    sched.step()
    if step % 5 == 0 or step == total_steps - 1:
        wd = ", ".join(f"{g['weight_decay']:.3g}" for g in opt.param_groups)
        print(f"after step {step + 1:2d}: weight_decay per group {wd} (wd_step {opt.param_groups[0]['wd_step']})")
