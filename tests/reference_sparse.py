"""A per-slice Python loop of SparseAdamW's update (the test reference): every slice along dim 0 of a "rows"
param has its own m, v, step count and decay mark; dense params take torch.optim.AdamW's update."""

from __future__ import annotations

import math

import torch


class ReferenceSparseAdamW:
    def __init__(self, rows_params, dense_params, lr, weight_decay, betas=(0.9, 0.999), eps=1e-8, catchup=True,
                 decay="decoupled", lr_max=None):
        self.rows_params = list(rows_params)
        self.dense = torch.optim.AdamW(list(dense_params), lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                       foreach=False) if dense_params else None
        self.lr, self.wd, self.betas, self.eps = lr, weight_decay, betas, eps
        self.catchup, self.decay, self.lr_max = catchup, decay, lr_max or lr
        self.L = 0.0
        self.slices = {p: [dict(step=0, m=torch.zeros_like(p[r]), v=torch.zeros_like(p[r]), mark=0.0)
                           for r in range(p.shape[0])] for p in self.rows_params}

    def _w(self):
        return self.wd / self.lr_max if self.decay == "independent" else self.wd

    @torch.no_grad()
    def step(self, grads: dict, touched: dict, lr=None):
        lr = self.lr if lr is None else lr
        b1, b2 = self.betas
        L_before = self.L
        log_f = math.log(1 - lr * self._w()) if self.wd and self.decay != "l2" else 0.0
        for p in self.rows_params:
            for r, st in enumerate(self.slices[p]):
                if not touched[p][r]:
                    continue  # idle slice: weights, moments and step untouched
                g = grads[p][r].clone()
                st["step"] += 1
                row = p[r]
                if self.wd and self.decay != "l2":
                    if self.catchup:
                        row.mul_(math.exp(L_before - st["mark"]))
                    row.mul_(1 - lr * self._w())
                elif self.wd:
                    g = g + self.wd * row
                st["m"].lerp_(g, 1 - b1)
                st["v"].mul_(b2).addcmul_(g, g, value=1 - b2)
                bc1 = 1 - b1 ** st["step"]
                bc2 = 1 - b2 ** st["step"]
                denom = (st["v"].sqrt() / math.sqrt(bc2)).add_(self.eps)
                row.addcdiv_(st["m"], denom, value=-lr / bc1)
                st["mark"] = L_before + log_f
        self.L += log_f
        if self.dense is not None:
            for group in self.dense.param_groups:
                group["lr"] = lr
            self.dense.step()
