"""Accelerate: ``prepare()`` a model and a ShardedAdamW so that Accelerate's conveniences mean what they say.

::

    from zeroadamw.integrations.accelerate import prepare
    model, opt, loader, sched = prepare(accelerator, model, ShardedAdamW(model.parameters(), ...), loader, sched)
    for batch in loader:
        with accelerator.accumulate(model):          # no_sync() on the non-final micro-batches -> ours
            accelerator.backward(model(**batch).loss)
            accelerator.clip_grad_norm_(model.parameters(), 1.0)   # -> ShardedAdamW(max_grad_norm=1.0), exact
            opt.step(); sched.step(); opt.zero_grad()
    accelerator.save_state("ckpt")   # works (consolidated state_dict on every rank); for big models prefer
                                     # zeroadamw.checkpoint.save(path, model=..., optimizer=...)

What ``prepare`` changes against a plain ``accelerator.prepare``:

* the model is **not wrapped in DistributedDataParallel**: ShardedAdamW reduces gradients itself (stage 2
  reduce-scatters them during backward; DDP would all-reduce them a second time and refill ``param.grad``);
* ``accelerator.accumulate(model)`` / ``accelerator.no_sync(model)`` use the optimizer's ``no_sync()``;
* ``accelerator.clip_grad_norm_(params, max_norm)`` sets the optimizer's exact global-norm clipping and returns
  a 0-d tensor that ``step()`` fills with the pre-clip global norm (log it after ``step()``);
* GradScaler (fp16) reaches the optimizer's ``grad_scaler=`` argument through Accelerate's step wrapper, so every
  rank's inf check agrees;
* ``accelerator.get_state_dict`` (what ``save_state`` / ``save_model`` save) clones the params that are views of
  one bucket buffer: Accelerate's safetensors save keeps one tensor per storage and would drop the rest.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch

from ..sharded_adamw import ShardedAdamW

__all__ = ["prepare", "patch_accelerator", "find_sharded_optimizer"]


def find_sharded_optimizer(obj: Any) -> ShardedAdamW | None:
    """The ShardedAdamW inside ``obj`` (itself, or wrapped by Accelerate/Trainer), or None."""
    seen = 0
    while isinstance(obj, torch.optim.Optimizer) and seen < 8:  # (LR schedulers also have .optimizer: not them)
        if isinstance(obj, ShardedAdamW):
            return obj
        obj = getattr(obj, "optimizer", None)
        seen += 1
    return None


def _fix_step_signature(acc_opt: Any) -> None:
    """Accelerate replaces ``optimizer.step`` with a wrapper without ``functools.wraps``, which hides the
    ``grad_scaler`` argument from GradScaler; point the wrapper's ``__wrapped__`` at the real method."""
    inner = find_sharded_optimizer(acc_opt)
    if inner is None:
        return
    step = inner.__dict__.get("step")
    if step is not None and not hasattr(step, "__wrapped__"):
        functools.update_wrapper(step, type(inner).step.__get__(inner))


def patch_accelerator(accelerator: Any, get_optimizer) -> None:
    """Patch ``accelerator`` (in place) for ShardedAdamW. ``get_optimizer()`` returns the optimizer in use (or
    None) at the time a model is prepared or gradients are clipped."""
    if getattr(accelerator, "_zeroadamw_patched", False):
        return
    accelerator._zeroadamw_patched = True
    original_prepare_model = accelerator.prepare_model
    original_prepare = accelerator.prepare
    original_clip = accelerator.clip_grad_norm_
    original_get_state_dict = accelerator.get_state_dict

    def prepare_model(model, device_placement=None, evaluation_mode=False):
        if find_sharded_optimizer(get_optimizer()) is not None:
            evaluation_mode = True  # skips only the DDP/FSDP wrapping: we reduce gradients ourselves
        return original_prepare_model(model, device_placement=device_placement, evaluation_mode=evaluation_mode)

    def prepare(*args, **kwargs):
        result = original_prepare(*args, **kwargs)
        items = result if isinstance(result, tuple) else (result,)
        opt = find_sharded_optimizer(get_optimizer())
        if opt is not None:
            for obj in items:
                _fix_step_signature(obj)
                if isinstance(obj, torch.nn.Module):
                    obj.no_sync = opt.no_sync  # what accelerator.no_sync / accumulate call on the model
        return result

    def clip_grad_norm_(parameters, max_norm, norm_type=2):
        opt = find_sharded_optimizer(get_optimizer())
        if opt is None:
            return original_clip(parameters, max_norm, norm_type)
        if float(norm_type) != 2.0:
            raise ValueError("ShardedAdamW clips the global L2 norm only (norm_type=2)")
        if max_norm is not None and 0 < float(max_norm) < math.inf:
            if opt.max_grad_norm != float(max_norm):
                opt.max_grad_norm = float(max_norm)
        return opt.grad_norm_tensor  # filled by step() with the pre-clip global norm

    def get_state_dict(model, *args, **kwargs):
        opt = find_sharded_optimizer(get_optimizer())
        if opt is not None:
            opt.wait_params()
        return _own_storage(original_get_state_dict(model, *args, **kwargs), opt)

    accelerator.prepare_model = prepare_model
    accelerator.prepare = prepare
    accelerator.clip_grad_norm_ = clip_grad_norm_
    accelerator.get_state_dict = get_state_dict  # save_state / save_model go through it


def _own_storage(state_dict: Any, opt: ShardedAdamW | None) -> Any:
    """Params that are views of one bucket buffer share a storage; Accelerate's safetensors save keeps one tensor
    per storage (``clean_state_dict_for_safetensors``) and would drop the others. Clone those entries."""
    if opt is None or not isinstance(state_dict, dict):
        return state_dict
    flats = {b.flat.untyped_storage().data_ptr() for b in opt.engine.buckets if b.flat is not None}
    if not flats:
        return state_dict
    return type(state_dict)((k, v.clone() if isinstance(v, torch.Tensor) and v.device.type != "meta"
                             and v.untyped_storage().data_ptr() in flats else v) for k, v in state_dict.items())


def prepare(accelerator: Any, *objects: Any, **kwargs: Any):
    """``accelerator.prepare(*objects)`` for a set that contains a ShardedAdamW (see the module docstring)."""
    opts = [o for o in objects if find_sharded_optimizer(o) is not None]
    if len(opts) != 1:
        raise ValueError("zeroadamw.integrations.accelerate.prepare needs exactly one ShardedAdamW among the objects")
    holder = {"opt": opts[0]}
    patch_accelerator(accelerator, lambda: holder["opt"])
    return accelerator.prepare(*objects, **kwargs)
