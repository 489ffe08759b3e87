"""AdaLomo (Lv et al., 2023): LOMO with an Adafactor-style factored second moment and grouped update normalisation.

Matrices (``ndim >= 2``) keep row and column statistics of the second moment over their last two dims,
replicated on every rank (``exp_avg_sq_row`` / ``exp_avg_sq_col``); vectors an element-wise ``exp_avg_sq``,
sharded like the param. The update of an element needs sums over its whole parameter (row/column sums, the RMS
of the update and of the weights), so a bucket's update does two small all-reduces: this rule is not
element-wise and runs :meth:`AdaLomoRule.update_bucket` itself. Math: :mod:`zeroadamw.functional`
(``factored_partial_sums``, ``factored_scale``, ``adalomo_beta2``).
"""

from __future__ import annotations

import math

import torch

from .. import functional as F
from ..options import lr_max
from .base import Rule


class AdaLomoRule(Rule):
    name = "adalomo"
    elementwise = False
    hyper_keys = ("adalomo_eps", "clip_threshold", "decay_rate")

    @staticmethod
    def check_hyper(kwargs):
        adalomo_eps, clip_threshold, decay_rate = (kwargs[k] for k in AdaLomoRule.hyper_keys)
        if (not isinstance(adalomo_eps, (tuple, list)) or len(adalomo_eps) != 2
                or not all(isinstance(e, (int, float)) and e >= 0 for e in adalomo_eps)):
            raise ValueError(f"adalomo_eps must be a pair of non-negative floats, got {adalomo_eps!r}")
        if not clip_threshold > 0:
            raise ValueError(f"clip_threshold must be > 0, got {clip_threshold}")
        if not decay_rate < 0:
            raise ValueError(f"decay_rate must be < 0 (beta2_t = 1 - t**decay_rate), got {decay_rate}")
        return dict(adalomo_eps=tuple(adalomo_eps), clip_threshold=float(clip_threshold), decay_rate=float(decay_rate))

    def init_param_state(self, bucket, i):
        p = bucket.params[i]
        kw = dict(dtype=torch.float32, device=p.device)
        if p.ndim >= 2:  # factored second moment over the last two dims, replicated on every rank
            return {"exp_avg_sq_row": torch.zeros(p.shape[:-1], **kw),
                    "exp_avg_sq_col": torch.zeros(p.shape[:-2] + p.shape[-1:], **kw)}
        return {"exp_avg_sq": torch.zeros(bucket.layout.slots[i].owned, **kw)}  # a vector: sharded like the param

    def layout_of(self, key):
        if key in ("exp_avg_sq_row", "exp_avg_sq_col"):
            return "full"
        return super().layout_of(key)

    def extra_state_bytes(self, state):
        return sum(t.numel() * t.element_size() for st in state.values() for k, t in st.items()
                   if k.startswith("exp_avg_sq"))

    def update_bucket(self, opt, bucket, present, grad_scale) -> None:
        """AdaLomo on the owned ranges of a bucket's present params (see functional.py for the math). Row/column
        statistics and the two per-parameter RMS values need sums over whole parameters: two small all-reduces
        per bucket make them identical on every rank."""
        group = opt.param_groups[bucket.group_index]
        opt._refresh_master(bucket, [i for i in range(len(present)) if present[i]])
        eps0, eps1 = group["adalomo_eps"]
        d, rate = group["clip_threshold"], group["decay_rate"]
        lr, wd, decay = float(group["lr"]), group["weight_decay"], group["decay"]
        idx = [i for i in range(len(present)) if present[i]]
        if not idx:
            return
        grads = dict(zip(idx, opt.engine.grad_views(bucket, idx) if opt.engine.sharded(bucket) else
                         [bucket.owned_grad_or_zeros(i) for i in idx]))
        items = []
        parts = []
        for i in idx:
            p, s = bucket.params[i], bucket.layout.slots[i]
            st = opt.state[p]
            st["step"] += 1
            theta = bucket.target_view(i)
            th32 = theta if theta.dtype == torch.float32 else theta.float()
            g = grads[i].to(torch.float32, copy=True)
            if grad_scale is not None:
                g.div_(grad_scale)
            if decay == "l2" and wd:
                g.add_(th32, alpha=wd)
            u = g * g + eps0
            if p.ndim >= 2:
                rows, cols = F.factored_partial_sums(u, s.own_lo, tuple(p.shape))
                parts += [rows, cols]
            parts.append(th32.square().sum().reshape(1))
            items.append((i, p, s, st, theta, th32, g, u))
        sums = torch.cat([t.to(torch.float32) for t in parts])
        if bucket.comm.world_size > 1:
            bucket.comm.all_reduce(sums, label="adalomo")
        usq_parts, pos, updates = [], 0, []
        for i, p, s, st, theta, th32, g, u in items:
            beta = F.adalomo_beta2(float(st["step"]), rate)
            if p.ndim >= 2:
                R, C = p.shape[-2], p.shape[-1]
                nrow, ncol = st["exp_avg_sq_row"].numel(), st["exp_avg_sq_col"].numel()
                row_tot, col_tot = sums[pos : pos + nrow], sums[pos + nrow : pos + nrow + ncol]
                pos += nrow + ncol
                row_s, col_s = st["exp_avg_sq_row"].view(-1), st["exp_avg_sq_col"].view(-1)
                row_s.mul_(beta).add_(row_tot / C, alpha=1 - beta)
                col_s.mul_(beta).add_(col_tot / R, alpha=1 - beta)
                r = row_s.view(-1, R)
                row_factor = (r / r.mean(dim=-1, keepdim=True)).rsqrt().view(-1)
                upd = g.clone()
                F.factored_scale(upd, s.own_lo, tuple(p.shape), row_factor, col_s.rsqrt())
            else:
                v = st["exp_avg_sq"]
                v.mul_(beta).add_(u, alpha=1 - beta)
                upd = g * v.rsqrt()
            psq = sums[pos]
            pos += 1
            usq_parts.append(upd.square().sum().reshape(1))
            updates.append((p, s, theta, th32, upd, psq))
        usq = torch.cat(usq_parts)
        if bucket.comm.world_size > 1:
            bucket.comm.all_reduce(usq, label="adalomo")
        for (p, s, theta, th32, upd, psq), sq in zip(updates, usq.tolist()):
            n = p.numel()
            upd.div_(max(1.0, math.sqrt(sq / n) / d))
            gamma = lr * max(eps1, math.sqrt(float(psq) / n))
            if wd and decay != "l2":
                th32.mul_(1 - gamma * F.effective_weight_decay(decay, wd, lr_max(group)))
            th32.add_(upd, alpha=-gamma)
            if th32 is not theta:
                theta.copy_(th32)
