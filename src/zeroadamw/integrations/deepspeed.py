"""DeepSpeed: zeroadamw as the *client optimizer* of ``deepspeed.initialize(optimizer=...)``.

::

    from zeroadamw.integrations.deepspeed import client_optimizer
    opt = client_optimizer(model.parameters(), ds_config, lr=2e-5, weight_decay=0.1, decay="decoupled")
    engine, opt, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=ds_config)

Under ZeRO stage >= 1 DeepSpeed partitions the optimizer state itself: it hands its client optimizer flat fp32
partitions by replacing the tensors in ``param_groups``. zeroadamw must then not shard again and cannot do
anything row-aware: ``client_optimizer`` returns the plain :class:`zeroadamw.AdamW` (same kernels, same decay
modes). A :class:`~zeroadamw.ShardedAdamW` handed to DeepSpeed directly detects the replacement at its first
backward/step and acts as the same plain AdamW from then on. At stage 0 (DeepSpeed all-reduces gradients, no
partitioning) ``client_optimizer`` returns a ShardedAdamW at stage 1 with ``grads_reduced=True``: it shards the
optimizer state over the data-parallel ranks on top of DeepSpeed's all-reduce.

DeepSpeed config requirements (checked by :func:`check_config`, with the fix in the message):

* no ``"optimizer"`` block -- zeroadamw is the optimizer;
* ``"zero_allow_untested_optimizer": true`` for stage >= 1 (DeepSpeed only allows its own list otherwise);
* with ``offload_optimizer``, ``"zero_force_ds_cpu_optimizer": false`` -- otherwise DeepSpeed silently swaps in
  its own CPU Adam and our optimizer (and decay mode) is not used.
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterable

import torch

from ..adamw import AdamW
from ..sharded_adamw import ShardedAdamW

__all__ = ["check_config", "client_optimizer", "initialize"]


def check_config(config: dict | str | os.PathLike) -> dict:
    """Load (if a path) and check a DeepSpeed config for use with a zeroadamw client optimizer."""
    if isinstance(config, (str, os.PathLike)):
        with open(config) as f:
            config = json.load(f)
    if not isinstance(config, dict):
        raise TypeError(f"DeepSpeed config must be a dict or a JSON path, got {type(config).__name__}")
    if "optimizer" in config:
        raise ValueError(
            "the DeepSpeed config has an 'optimizer' block and zeroadamw is passed as the client optimizer: "
            "DeepSpeed would use its own. Remove the 'optimizer' block (zeroadamw's configs/ds_zero*.json have none)"
        )
    zero = config.get("zero_optimization", {}) or {}
    stage = int(zero.get("stage", 0))
    if stage >= 1 and not config.get("zero_allow_untested_optimizer", False):
        raise ValueError(
            f"DeepSpeed ZeRO stage {stage} refuses optimizers outside its list: add "
            '"zero_allow_untested_optimizer": true to the DeepSpeed config'
        )
    offload = zero.get("offload_optimizer") or {}
    if offload.get("device", "none") not in ("none", None) and config.get("zero_force_ds_cpu_optimizer", True):
        raise ValueError(
            "with offload_optimizer DeepSpeed replaces the client optimizer by its own CPU Adam unless "
            '"zero_force_ds_cpu_optimizer": false is set in the DeepSpeed config'
        )
    return config


def client_optimizer(params: Iterable, config: dict | str | os.PathLike, **kwargs: Any) -> torch.optim.Optimizer:
    """The zeroadamw optimizer to give ``deepspeed.initialize(optimizer=...)`` for this DeepSpeed config.

    ``kwargs``: lr, betas, eps, weight_decay, decay (and, at stage 0, any ShardedAdamW argument).
    """
    config = check_config(config)
    stage = int((config.get("zero_optimization") or {}).get("stage", 0))
    if stage >= 1:
        allowed = {"lr", "betas", "eps", "weight_decay", "decay", "impl"}
        unknown = set(kwargs) - allowed
        if unknown:
            raise ValueError(
                f"under DeepSpeed ZeRO-{stage} DeepSpeed partitions the state; these zeroadamw options do not apply "
                f"there: {sorted(unknown)} (allowed: {sorted(allowed)})"
            )
        return AdamW(params, **kwargs)
    kwargs.setdefault("stage", 1)
    kwargs.setdefault("grads_reduced", True)
    return ShardedAdamW(params, **kwargs)


def initialize(model: torch.nn.Module, config: dict | str | os.PathLike, optimizer_kwargs: dict | None = None,
               **deepspeed_kwargs: Any):
    """``deepspeed.initialize`` with a zeroadamw client optimizer (config checked first)."""
    import deepspeed

    config = check_config(config)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = client_optimizer(params, config, **(optimizer_kwargs or {}))
    return deepspeed.initialize(model=model, optimizer=opt, config=config, **deepspeed_kwargs)
