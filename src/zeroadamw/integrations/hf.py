"""Hugging Face Trainer (and TRL's SFTTrainer, which takes the same arguments).

::

    from zeroadamw.integrations.hf import ZeroTrainer            # or ZeroTrainerMixin for any Trainer subclass
    trainer = ZeroTrainer(model=model, args=TrainingArguments(..., max_grad_norm=1.0, gradient_accumulation_steps=4),
                          train_dataset=ds, zeroadamw={"stage": 2, "step_in_backward": False})
    trainer.train(resume_from_checkpoint=True)                   # also at another world size

    class MySFTTrainer(ZeroTrainerMixin, trl.SFTTrainer): ...   # TRL: mix in first

What the mixin does:

* **optimizer**: builds a :class:`~zeroadamw.ShardedAdamW` with Trainer's decay / no-decay groups (biases and norm
  weights get ``weight_decay=0``, as ``Trainer.create_optimizer`` does) and TrainingArguments' ``learning_rate``,
  ``adam_beta1/2``, ``adam_epsilon``, ``weight_decay``; ``zeroadamw={...}`` adds ShardedAdamW arguments (stage,
  step_in_backward, rule, decay, bucket_size, ...). ``optimizer_cls_and_kwargs=(ShardedAdamW, {...})`` works too.
  **MoE models** (params named ``*.experts.*``, e.g. Mixtral, Qwen-MoE) get a :class:`~zeroadamw.SparseAdamW` with
  :func:`~zeroadamw.moe_param_groups` (experts and embeddings row-sparse: idle experts take no ghost updates);
  ``zeroadamw={"moe": False}`` keeps the dense optimizer, ``"expert_process_group": g`` shards experts over ``g``.
* **no double reduction**: with several processes Trainer would wrap the model in DDP, which all-reduces full
  gradients again and writes them back into ``param.grad``; the mixin prepares the model without DDP (ShardedAdamW
  reduces itself) -- stage 2 stays stage 2 (counted by the optimizer's ``comm_counters()``).
* **clipping and logging**: ``max_grad_norm`` becomes the optimizer's exact global-norm clipping (over all shards;
  ``max_grad_norm=0`` with ``step_in_backward`` selects the fused variant), and the logged ``grad_norm`` is the
  optimizer's pre-clip global norm of the rank-averaged gradients.
* **gradient accumulation**: ``gradient_accumulation_steps`` micro-batches run under the optimizer's ``no_sync()``.
* **checkpoints**: the optimizer is saved in each ``checkpoint-<step>/zeroadamw_optimizer`` as a sharded,
  reshardable :mod:`zeroadamw.checkpoint` (every rank writes its shard; Trainer's own path calls
  ``optimizer.state_dict()`` on the saving rank only, which for a sharded optimizer would hang) and
  ``resume_from_checkpoint`` loads it at any world size.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from transformers import Trainer

from .. import checkpoint as zckpt
from ..sharded_adamw import ShardedAdamW
from .accelerate import find_sharded_optimizer, patch_accelerator

__all__ = ["ZeroTrainerMixin", "ZeroTrainer", "OPTIMIZER_DIR", "trainer_param_groups"]

OPTIMIZER_DIR = "zeroadamw_optimizer"
SCHEDULER_NAME = "scheduler.pt"


def trainer_param_groups(trainer: Trainer, model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Trainer's decay / no-decay split of the trainable params (empty groups dropped), named ``"decay"`` and
    ``"no_decay"`` (the names label zeroadamw.diagnostics' logs)."""
    decay_names = set(trainer.get_decay_parameter_names(model))
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (decay if name in decay_names else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay, "name": "decay"},
              {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]
    return [g for g in groups if g["params"]]


class ZeroTrainerMixin:
    """Mix into any ``transformers.Trainer`` subclass, before it: ``class T(ZeroTrainerMixin, Trainer)``."""

    def __init__(self, *args: Any, zeroadamw: dict | None = None, **kwargs: Any) -> None:
        self.zeroadamw_kwargs = dict(zeroadamw) if zeroadamw is not None else None
        super().__init__(*args, **kwargs)

    # -------------------------------------------------------------------------------------------- optimizer
    def create_accelerator_and_postprocess(self) -> None:
        super().create_accelerator_and_postprocess()
        patch_accelerator(self.accelerator, lambda: getattr(self, "optimizer", None))

    def create_optimizer(self, model=None):
        opt_model = self.model if model is None else model
        if self.optimizer is None and self.zeroadamw_kwargs is not None and getattr(self, "is_deepspeed_enabled", False):
            # DeepSpeed partitions the state itself and hands its client optimizer flat fp32 partitions: use the
            # plain AdamW (same kernels and decay modes), no sharding of ours on top
            from ..adamw import AdamW

            args = self.args
            decay = self.zeroadamw_kwargs.get("decay", "decoupled")
            self.optimizer = AdamW(trainer_param_groups(self, opt_model, args.weight_decay), lr=args.learning_rate,
                                   betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon, decay=decay)
        elif self.optimizer is None and self.zeroadamw_kwargs is not None:
            args = self.args
            kwargs = dict(
                lr=args.learning_rate,
                betas=(args.adam_beta1, args.adam_beta2),
                eps=args.adam_epsilon,
                max_grad_norm=args.max_grad_norm if args.max_grad_norm and args.max_grad_norm > 0 else None,
            )
            kwargs.update(self.zeroadamw_kwargs)
            moe = kwargs.pop("moe", "auto")
            has_experts = any(".experts." in n and p.requires_grad for n, p in opt_model.named_parameters())
            if moe is True or (moe == "auto" and has_experts and not kwargs.get("step_in_backward")):
                # MoE: idle experts must not take ghost updates -> SparseAdamW with per-expert (row) groups
                from ..sparse_adamw import SparseAdamW, moe_param_groups

                groups, self.zeroadamw_group_names = moe_param_groups(
                    opt_model, weight_decay=args.weight_decay, expert_process_group=kwargs.pop("expert_process_group", None))
                self.optimizer = SparseAdamW(groups, **kwargs)
            else:
                self.optimizer = ShardedAdamW(trainer_param_groups(self, opt_model, args.weight_decay), **kwargs)
        else:
            super().create_optimizer(model)
        opt = find_sharded_optimizer(self.optimizer)
        if opt is not None and self.args.max_grad_norm and self.args.max_grad_norm > 0:
            opt.max_grad_norm = float(self.args.max_grad_norm)
        return self.optimizer

    def log(self, logs: dict, *args: Any, **kwargs: Any) -> None:
        opt = find_sharded_optimizer(getattr(self, "optimizer", None))
        if opt is not None and "loss" in logs and "grad_norm" not in logs and opt.grad_norm is not None:
            logs["grad_norm"] = opt.grad_norm
        return super().log(logs, *args, **kwargs)

    # ------------------------------------------------------------------------------------------ checkpoints
    def _zero_model(self) -> torch.nn.Module:
        return self.accelerator.unwrap_model(self.model) if hasattr(self, "accelerator") else self.model

    def save_model(self, *args: Any, **kwargs: Any):
        opt = find_sharded_optimizer(getattr(self, "optimizer", None))
        if opt is not None:
            opt.wait_params()  # overlap_param_gather: the weights written are the updated ones
        return super().save_model(*args, **kwargs)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        opt = find_sharded_optimizer(self.optimizer)
        if opt is None:
            return super()._save_optimizer_and_scheduler(output_dir)
        # every rank writes its shard (a collective); Trainer calls this on every rank
        zckpt.save(os.path.join(output_dir, OPTIMIZER_DIR), model=self._zero_model(), optimizer=opt, save_model=False)
        if self.args.should_save and self.lr_scheduler is not None:
            torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, SCHEDULER_NAME))

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        opt = find_sharded_optimizer(self.optimizer)
        if checkpoint is None or opt is None:
            return super()._load_optimizer_and_scheduler(checkpoint)
        path = os.path.join(checkpoint, OPTIMIZER_DIR)
        if not os.path.isdir(path):
            raise zckpt.CheckpointError(
                f"{checkpoint} has no {OPTIMIZER_DIR}/ (it was not written by a ZeroTrainer with ShardedAdamW); "
                "resuming would start the optimizer fresh -- start a new run, or resume with the optimizer it used"
            )
        zckpt.load(path, model=self._zero_model(), optimizer=opt, load_model=False)
        sched = os.path.join(checkpoint, SCHEDULER_NAME)
        if self.lr_scheduler is not None and os.path.isfile(sched):
            self.lr_scheduler.load_state_dict(torch.load(sched, weights_only=True))


class ZeroTrainer(ZeroTrainerMixin, Trainer):
    """``transformers.Trainer`` with :class:`ZeroTrainerMixin`: sharded AdamW, no DDP double reduction, exact
    clipping, reshardable checkpoints."""
