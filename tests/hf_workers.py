"""Per-rank bodies of the HF Trainer / Accelerate tests (spawned processes, torchrun-style environment)."""

from __future__ import annotations

import os

import torch

from helpers import tiny_llama

SEQ, VOCAB, N_SAMPLES = 12, 97, 96


class TokenDataset(torch.utils.data.Dataset):
    def __init__(self, n=N_SAMPLES):
        g = torch.Generator().manual_seed(1234)
        self.ids = torch.randint(0, VOCAB, (n, SEQ), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def make_trainer(out_dir, world, per_device, zero_kwargs, max_steps, save_steps=None, accum=1, max_grad_norm=1.0,
                 lora=False, plain=False):
    """ZeroTrainer (or, ``plain=True``, transformers.Trainer with its default torch AdamW) on tiny Llama."""
    from transformers import Trainer, TrainingArguments

    from zeroadamw.integrations.hf import ZeroTrainer

    class SequentialZeroTrainer(Trainer if plain else ZeroTrainer):
        # the same global batches at any world size: sequential order, sharded by accelerate batch by batch
        def _get_train_sampler(self, *args, **kwargs):
            return torch.utils.data.SequentialSampler(self.train_dataset)

    model = tiny_llama(seed=0, freeze_norm=True)
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                 lora_dropout=0.0))
    args = TrainingArguments(
        output_dir=out_dir,
        per_device_train_batch_size=per_device,
        gradient_accumulation_steps=accum,
        learning_rate=3e-3,
        weight_decay=0.1,
        max_grad_norm=max_grad_norm,
        max_steps=max_steps,
        lr_scheduler_type="cosine",
        warmup_steps=2,
        logging_steps=1,
        save_strategy="steps" if save_steps else "no",
        save_steps=save_steps or 500,
        report_to=[],
        use_cpu=True,
        seed=0,
        data_seed=0,
        dataloader_drop_last=True,
        disable_tqdm=True,
    )
    extra = {} if plain else {"zeroadamw": zero_kwargs}
    return SequentialZeroTrainer(model=model, args=args, train_dataset=TokenDataset(), **extra)


def train_run(rank, world, out_dir, per_device, zero_kwargs, max_steps, save_steps=None, resume=None, accum=1,
              max_grad_norm=1.0, lora=False):
    """Train (optionally resuming); return final params, the logged grad norms, comm counters, the model type."""
    trainer = make_trainer(out_dir, world, per_device, zero_kwargs, max_steps, save_steps, accum, max_grad_norm, lora)
    trainer.train(resume_from_checkpoint=resume)
    from zeroadamw.integrations.accelerate import find_sharded_optimizer

    opt = find_sharded_optimizer(trainer.optimizer)
    model = trainer.accelerator.unwrap_model(trainer.model)
    logs = [h for h in trainer.state.log_history if "grad_norm" in h]
    return {
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "grad_norms": [h["grad_norm"] for h in logs],
        "losses": [h["loss"] for h in logs],
        "model_type": type(trainer.model).__name__,
        "comm": opt.comm_counters(),
        "state_bytes": opt.state_bytes(),
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "padded": sum(b.layout.padded for b in opt.engine.buckets),
    }


def scenarios(rank, world, root, cfgs):
    """Several trainings in one set of processes (accelerate's state is shared); each cfg: name, kwargs."""
    out = {}
    for name, kw in cfgs:
        kw = dict(kw)
        out_dir = os.path.join(root, kw.pop("dir", name))
        out[name] = train_run(rank, world, out_dir, **kw)
    return out
