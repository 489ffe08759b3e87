"""Per-rank bodies of the DeepSpeed tests (torchrun-style environment; DeepSpeed initialises gloo itself)."""

from __future__ import annotations

import torch

from helpers import llama_batch, tiny_llama


def ds_train(rank, world, kind, stage, steps=5):
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    model = tiny_llama()
    params = [p for p in model.parameters() if p.requires_grad]
    cfg = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
           "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True,
           "zero_force_ds_cpu_optimizer": False, "steps_per_print": 10**6}
    if kind == "torch":
        opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.1, foreach=False)
    elif kind == "sharded":  # a ShardedAdamW handed to DeepSpeed as is: detects the partitioning, acts plain
        from zeroadamw import ShardedAdamW

        opt = ShardedAdamW(params, lr=1e-3, weight_decay=0.1, impl="reference")
    elif kind == "sharded_int8":  # the same, with int8 moments: DeepSpeed's flat fp32 partitions get 8-bit state
        from zeroadamw import ShardedAdamW

        opt = ShardedAdamW(params, lr=1e-3, weight_decay=0.1, impl="reference", state_dtype="int8")
    else:  # the helper's choice for this config
        from zeroadamw.integrations.deepspeed import client_optimizer

        opt = client_optimizer(params, cfg, lr=1e-3, weight_decay=0.1, impl="reference")
    engine, wrapped, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
    losses = []
    for step in range(steps):
        ids = llama_batch(step, rank)
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    state = [t for st in getattr(opt, "state", {}).values() for k, t in st.items() if k in ("exp_avg", "exp_avg_sq")]
    return {"params": {n: p.detach().clone() for n, p in model.named_parameters()}, "losses": losses,
            "plain": getattr(opt, "_plain", None), "wrapper": type(wrapped).__name__,
            "state_dtypes": sorted({str(t.dtype) for t in state})}
