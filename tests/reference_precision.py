"""Reference for the precision-aware state, written to be read: one parameter at a time, whole tensors, a
brute-force quantizer (nearest map value by argmin, block by block in a Python loop), fp32 AdamW math from
``functional.adamw_reference``. The optimizers must match it bit for bit in one process (same slices), and
to float tolerance across world sizes (the fp32 math then runs on other slices)."""

from __future__ import annotations

import torch

from zeroadamw import functional as F
from zeroadamw.quant import BLOCK, MIN_QUANTIZED_NUMEL, dynamic_map


def ref_quantize(x: torch.Tensor, signed: bool, ties: str = "argmin") -> tuple[torch.Tensor, torch.Tensor]:
    """Codes (uint8, shaped like x) and absmax per 256-element block counted from x's first element: the map
    value nearest to x / absmax by ``argmin`` of the distance, or (``ties="midpoint"``) by comparing with the
    fp32 midpoints between neighbouring map values -- the two differ only where x / absmax is within an fp32
    rounding of a midpoint, which coarse (bf16) gradients hit; the optimizer uses midpoints."""
    qmap = dynamic_map(signed)
    mids = (qmap[1:] + qmap[:-1]) / 2
    flat = x.reshape(-1).float()
    codes = torch.empty(flat.numel(), dtype=torch.uint8)
    absmax = torch.empty(-(-flat.numel() // BLOCK), dtype=torch.float32)
    for b in range(absmax.numel()):
        blk = flat[b * BLOCK : (b + 1) * BLOCK]
        a = blk.abs().max()
        absmax[b] = a
        normed = blk * (1.0 / a if a > 0 else 1.0)
        if ties == "argmin":
            c = (normed[:, None] - qmap[None, :]).abs().argmin(dim=1)
        else:
            c = (normed[:, None] > mids[None, :]).sum(dim=1)  # how many midpoints lie below: the code
        codes[b * BLOCK : b * BLOCK + blk.numel()] = c.to(torch.uint8)
    return codes.view(x.shape), absmax


def ref_dequantize(codes: torch.Tensor, absmax: torch.Tensor, signed: bool) -> torch.Tensor:
    qmap = dynamic_map(signed)
    flat = qmap[codes.reshape(-1).long()]
    scale = absmax.repeat_interleave(BLOCK)[: flat.numel()]
    return (flat * scale).view(codes.shape)


def ref_stochastic_bf16(x: torch.Tensor, step: torch.Tensor, salt: int) -> torch.Tensor:
    """bf16 with stochastic rounding, as specified in zeroadamw.quant.stochastic_bf16: 16 bits of a
    counter hash of (element index, step, salt) in 32-bit unsigned arithmetic (Python ints), added to the fp32
    bits, truncated."""
    M = 0xFFFFFFFF

    def h(i):
        v = (i * 0x5BD1E995 + (int(step) * 0x27D4EB2F + salt)) & M
        v ^= v >> 15
        v = (v * 0x2C1B3C6D) & M
        v ^= v >> 13
        return v >> 16

    r = torch.tensor([h(i) for i in range(x.numel())], dtype=torch.int64)
    bits = (x.reshape(-1).float().view(torch.int32).to(torch.int64) + r) & ~0xFFFF
    return bits.to(torch.int32).view(torch.float32).view(x.shape).to(torch.bfloat16)


class RefPrecisionAdamW:
    """AdamW over whole params with moments stored as ``state_dtype`` and bf16 weights either with an fp32
    master (``master=True``), Kahan-compensated (``kahan=True``) or plain."""

    def __init__(self, params, lr, betas, eps, weight_decay, state_dtype="fp32", master=True, kahan=False):
        self.params = list(params)
        self.hp = dict(lr=lr, beta1=betas[0], beta2=betas[1], eps=eps, weight_decay=weight_decay)
        self.state_dtype, self.master, self.kahan = state_dtype, master, kahan
        self.state = {}

    def _int8(self, p):
        return self.state_dtype == "int8" and p.numel() >= MIN_QUANTIZED_NUMEL

    def zero_grad(self, set_to_none=True):
        for p in self.params:
            p.grad = None

    def step(self):
        for p in self.params:
            if p.grad is None:
                continue
            low = p.dtype in (torch.bfloat16, torch.float16)
            st = self.state.setdefault(p, {})
            if not st:
                st["step"] = torch.zeros(())
                if self._int8(p):
                    st["exp_avg"], st["exp_avg_absmax"] = ref_quantize(torch.zeros(p.shape), True)
                    st["exp_avg_sq"], st["exp_avg_sq_absmax"] = ref_quantize(torch.zeros(p.shape), False)
                else:
                    md = torch.bfloat16 if self.state_dtype == "bf16" else torch.float32
                    st["exp_avg"], st["exp_avg_sq"] = torch.zeros(p.shape, dtype=md), torch.zeros(p.shape, dtype=md)
                if low and self.master:
                    st["master"] = p.detach().float().clone()
                if low and self.kahan:
                    st["kahan_comp"] = torch.zeros_like(p)
            if self._int8(p):
                m = ref_dequantize(st["exp_avg"], st["exp_avg_absmax"], True)
                v = ref_dequantize(st["exp_avg_sq"], st["exp_avg_sq_absmax"], False)
                m = torch.where(v == 0, torch.zeros_like(m), m)  # a second moment quantized to 0: m restarts too
            else:
                m, v = st["exp_avg"].float(), st["exp_avg_sq"].float()
            if "master" in st:
                w = st["master"]
            elif "kahan_comp" in st:
                w = p.detach().float() + st["kahan_comp"].float()
            else:
                w = p.detach().float()
            F.adamw_reference([w], [p.grad.float()], [m], [v], [st["step"]], **self.hp)
            if self._int8(p):
                st["exp_avg"], st["exp_avg_absmax"] = ref_quantize(m, True, "midpoint")
                st["exp_avg_sq"], st["exp_avg_sq_absmax"] = ref_quantize(v, False, "midpoint")
            elif self.state_dtype == "bf16":  # stochastic rounding keyed on (element index, step), as specified
                st["exp_avg"].copy_(m)  # round to nearest
                st["exp_avg_sq"].copy_(ref_stochastic_bf16(v, st["step"], 2))
            else:
                st["exp_avg"].copy_(m)
                st["exp_avg_sq"].copy_(v)
            with torch.no_grad():
                new = w.to(p.dtype)
                if "kahan_comp" in st:
                    st["kahan_comp"].copy_(w - new.float())
                p.copy_(new)
