"""Reference implementations of the LOMO and AdaLomo updates, written from the papers (and lomo_optim's code,
which needs CUDA), on whole tensors, one parameter at a time -- no sharding, no buckets, no fused kernels."""

from __future__ import annotations

import math

import torch


class ReferenceLomo:
    """LOMO (Lv et al., ACL 2024): SGD fused into backward. A hook on every parameter applies
    p <- p * (1 - lr * wd) - lr * g the moment the parameter's gradient is accumulated, and frees it."""

    def __init__(self, params, lr: float, weight_decay: float = 0.0):
        self.lr, self.wd = lr, weight_decay
        self.handles = [p.register_post_accumulate_grad_hook(self._hook) for p in params if p.requires_grad]

    def _hook(self, p):
        with torch.no_grad():
            g = p.grad.float()
            p32 = p.detach().float()
            if self.wd:
                p32.mul_(1 - self.lr * self.wd)
            p32.add_(g, alpha=-self.lr)
            p.copy_(p32)
        p.grad = None


class ReferenceAdaLomo:
    """AdaLomo (Lv et al., 2023) on whole tensors; matrices factor the second moment over the last two dims
    (batched over leading dims, e.g. MoE experts [E, out, in]), vectors keep it element-wise."""

    def __init__(self, params, lr, weight_decay=0.0, eps=(1e-30, 1e-3), clip_threshold=1.0, decay_rate=-0.8):
        self.params = [p for p in params if p.requires_grad]
        self.lr, self.wd, self.eps, self.d, self.rate = lr, weight_decay, eps, clip_threshold, decay_rate
        self.state = {}

    @torch.no_grad()
    def step(self, grads: dict, lr: float | None = None):
        lr = self.lr if lr is None else lr
        for p in self.params:
            g = grads.get(p)
            if g is None:
                continue
            st = self.state.setdefault(p, {"step": 0})
            st["step"] += 1
            beta = 1.0 - math.pow(st["step"], self.rate)
            g = g.float()
            u = g * g + self.eps[0]
            if p.ndim >= 2:
                if "row" not in st:
                    st["row"] = torch.zeros(p.shape[:-1])
                    st["col"] = torch.zeros(p.shape[:-2] + p.shape[-1:])
                st["row"].mul_(beta).add_(u.mean(dim=-1), alpha=1 - beta)
                st["col"].mul_(beta).add_(u.mean(dim=-2), alpha=1 - beta)
                r = (st["row"] / st["row"].mean(dim=-1, keepdim=True)).rsqrt().unsqueeze(-1)
                c = st["col"].unsqueeze(-2).rsqrt()
                update = g * r * c
            else:
                st.setdefault("v", torch.zeros_like(g))
                st["v"].mul_(beta).add_(u, alpha=1 - beta)
                update = g * st["v"].rsqrt()
            rms_u = update.norm(2) / math.sqrt(update.numel())
            update.div_(max(1.0, (rms_u / self.d).item()))
            p32 = p.detach().float()
            rms_p = (p32.norm(2) / math.sqrt(p.numel())).item()
            gamma = lr * max(self.eps[1], rms_p)
            if self.wd:
                p32.mul_(1 - gamma * self.wd)
            p32.add_(update, alpha=-gamma)
            p.copy_(p32)
