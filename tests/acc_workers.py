"""Per-rank bodies of the plain-Accelerate tests (torchrun-style environment)."""

from __future__ import annotations

import os

import torch

from helpers import llama_batch, llama_loss, param_groups, tiny_llama


def accelerate_loop(rank, world, root, steps, resume_at=None):
    """A plain Accelerate loop: prepare, accumulate (2 micro-batches), clip_grad_norm_, save_state/load_state."""
    from accelerate import Accelerator

    from zeroadamw import ShardedAdamW
    from zeroadamw.integrations.accelerate import prepare

    # (step_scheduler_with_optimizer=False: Accelerate would otherwise step the scheduler num_processes times)
    acc = Accelerator(cpu=True, gradient_accumulation_steps=2, step_scheduler_with_optimizer=False)
    model = tiny_llama()
    opt = ShardedAdamW(param_groups(model, lr=3e-3), stage=2, bucket_size=3000)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 3))
    model, opt, sched = prepare(acc, model, opt, sched)
    start = 0
    if resume_at is not None:
        acc.load_state(os.path.join(root, "state"))
        start = resume_at
    norms = []
    norm = None
    for step in range(start, steps):
        for micro in range(2):
            with acc.accumulate(model):
                loss = llama_loss(model, llama_batch(step, rank, micro))
                acc.backward(loss)
                norm = acc.clip_grad_norm_(model.parameters(), 0.5) if acc.sync_gradients else norm
                opt.step()
                if acc.sync_gradients:
                    sched.step()
                opt.zero_grad()
        norms.append(float(norm))  # the tensor clip_grad_norm_ returned, filled by step()
    return {"params": {n: p.detach().clone() for n, p in acc.unwrap_model(model).named_parameters()},
            "norms": norms, "model_type": type(model).__name__, "comm": opt.optimizer.comm_counters()}


def accelerate_save(rank, world, root, steps):
    """Train ``steps`` steps and save_state (every rank calls state_dict: our consolidated, collective one)."""
    from accelerate import Accelerator

    from zeroadamw import ShardedAdamW
    from zeroadamw.integrations.accelerate import prepare

    # (step_scheduler_with_optimizer=False: Accelerate would otherwise step the scheduler num_processes times)
    acc = Accelerator(cpu=True, gradient_accumulation_steps=2, step_scheduler_with_optimizer=False)
    model = tiny_llama()
    opt = ShardedAdamW(param_groups(model, lr=3e-3), stage=2, bucket_size=3000)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 3))
    model, opt, sched = prepare(acc, model, opt, sched)
    for step in range(steps):
        for micro in range(2):
            with acc.accumulate(model):
                acc.backward(llama_loss(model, llama_batch(step, rank, micro)))
                if acc.sync_gradients:
                    acc.clip_grad_norm_(model.parameters(), 0.5)
                opt.step()
                if acc.sync_gradients:
                    sched.step()
                opt.zero_grad()
    acc.save_state(os.path.join(root, "state"))
    return True


def manual_loop(rank, world, steps):
    """The same training without Accelerate: ShardedAdamW's own no_sync() and max_grad_norm."""
    from zeroadamw import ShardedAdamW

    model = tiny_llama()
    opt = ShardedAdamW(param_groups(model, lr=3e-3), stage=2, bucket_size=3000, max_grad_norm=0.5)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 3))
    norms = []
    for step in range(steps):
        with opt.no_sync():
            (llama_loss(model, llama_batch(step, rank, 0)) / 2).backward()
        (llama_loss(model, llama_batch(step, rank, 1)) / 2).backward()
        opt.step()
        sched.step()
        opt.zero_grad()
        norms.append(opt.grad_norm)
    return {"params": {n: p.detach().clone() for n, p in model.named_parameters()}, "norms": norms}


def both(rank, world, root, steps):
    return {"acc": accelerate_loop(rank, world, root, steps), "manual": manual_loop(rank, world, steps)}
