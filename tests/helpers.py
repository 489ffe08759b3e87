"""Models, data and reference training shared by the tests (importable by spawned ranks)."""

from __future__ import annotations

import contextlib
import copy

import torch
from torch import nn


class MLP(nn.Module):
    """Small model with everything the optimizer must handle: odd sizes, a param smaller than any N > 1 (``gain``,
    1 element; ``shift``, 3 elements), a LayerNorm (no-decay group), a frozen param used in forward, and a param
    that never gets a gradient (``unused``)."""

    def __init__(self, d_in=16, d_hidden=33, d_out=7):
        super().__init__()
        self.fc1 = nn.Linear(d_in, d_hidden)
        self.norm = nn.LayerNorm(d_hidden)
        self.fc2 = nn.Linear(d_hidden, d_out)
        self.gain = nn.Parameter(torch.ones(1))
        self.shift = nn.Parameter(torch.zeros(3))
        self.frozen = nn.Parameter(torch.randn(d_in), requires_grad=False)
        self.unused = nn.Parameter(torch.randn(5))

    def forward(self, x):
        h = nn.functional.gelu(self.norm(self.fc1(x + self.frozen)))
        y = self.fc2(h) * self.gain
        return torch.cat([y[:, :3] + self.shift, y[:, 3:]], dim=1)

    def loss(self, batch):
        x, y = batch
        return nn.functional.mse_loss(self(x), y)


def mlp_batch(step: int, rank: int, micro: int = 0, n: int = 8, d_in: int = 16, d_out: int = 7, dtype=torch.float32):
    g = torch.Generator().manual_seed(1000 * step + 10 * rank + micro)
    return torch.randn(n, d_in, generator=g).to(dtype), torch.randn(n, d_out, generator=g).to(dtype)


def tiny_llama(seed: int = 0, dtype=torch.float32, freeze_norm: bool = True):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        attn_implementation="eager",
    )
    model = LlamaForCausalLM(cfg).to(dtype)
    if freeze_norm:
        model.model.norm.weight.requires_grad_(False)
    return model


def llama_batch(step: int, rank: int, micro: int = 0, n: int = 2, seq: int = 12, vocab: int = 97):
    g = torch.Generator().manual_seed(1000 * step + 10 * rank + micro)
    ids = torch.randint(0, vocab, (n, seq), generator=g)
    return ids


def llama_loss(model, ids):
    return model(input_ids=ids, labels=ids).loss


def param_groups(model, lr=1e-2, wd=0.1, no_decay_lr=5e-3, betas=(0.9, 0.99)):
    """Two groups like HF Trainer builds: decayed weights; biases and norm weights with no decay (another lr)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if (p.ndim < 2 or "norm" in name) else decay).append(p)
    return [
        {"params": decay, "lr": lr, "weight_decay": wd, "betas": betas},
        {"params": no_decay, "lr": no_decay_lr, "weight_decay": 0.0},
    ]


def loss_fn(model, batch):
    return model.loss(batch) if isinstance(model, MLP) else llama_loss(model, batch)


def reference_grads(model, batches_per_rank: list[list], world_size: int):
    """Set ``model``'s ``.grad`` to the rank-averaged gradient of all ranks' micro-batches, computed the way the
    ranks compute it: each rank's local gradient accumulates its micro-batches (loss / k), then the local
    gradients are summed in rank order and divided by the world size (what a sum-reduce + average does; for
    N = 2 this is bit-identical whatever order the collective adds in)."""
    params = [p for p in model.parameters() if p.requires_grad]
    total = [None] * len(params)
    for batches in batches_per_rank:
        k = len(batches)
        for p in params:
            p.grad = None
        for b in batches:
            (loss_fn(model, b) / k).backward()
        for i, p in enumerate(params):
            if p.grad is not None:
                total[i] = p.grad.clone() if total[i] is None else total[i].add_(p.grad)
    for p, t in zip(params, total):
        p.grad = None if t is None else t.div_(world_size)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max|a - b| / max|b| (0 when both are 0)."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    denom = b.abs().max().item()
    diff = (a - b).abs().max().item()
    if denom == 0:
        return diff
    return diff / denom


def max_state_err(sd: dict, ref_sd: dict, keys=("exp_avg", "exp_avg_sq")) -> float:
    if set(sd["state"]) != set(ref_sd["state"]):
        raise AssertionError(f"state keys differ: {sorted(sd['state'])} vs {sorted(ref_sd['state'])}")
    worst = 0.0
    for k, ref in ref_sd["state"].items():
        mine = sd["state"][k]
        if float(mine["step"]) != float(ref["step"]):
            raise AssertionError(f"param {k}: step {float(mine['step'])} != reference {float(ref['step'])}")
        for name in keys:
            worst = max(worst, rel_err(mine[name], ref[name]))
    return worst


def no_sync_if(opt, cond: bool):
    return opt.no_sync() if cond else contextlib.nullcontext()


def clone_model(model):
    return copy.deepcopy(model)
