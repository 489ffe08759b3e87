r"""Pure AdamW update math on lists of tensors: no ``torch.distributed``, no hooks, no optimizer objects.

Every kernel here has the same signature and the same meaning, and updates its arguments in place::

    adamw_<impl>(params, grads, exp_avgs, exp_avg_sqs, steps, *,
                 lr, beta1, beta2, eps, weight_decay, decay="decoupled", lr_max=None, grad_scale=None,
                 found_inf=None)

``steps`` are 0-d float32 tensors, incremented by the kernel (as in ``torch.optim``). ``grad_scale`` (a float or
a 0-d tensor) divides every gradient before use: it folds loss-scale unscaling and global-norm clipping into the
update without another pass over the gradients. ``found_inf`` (a 0-d float tensor, 0 or 1) skips the whole call
when non-zero -- params, moments *and* step counts unchanged; :func:`adamw_fused` decides that on the device
without a host read (the other two read it). Tensors of one call share a device and a dtype.

For step :math:`t` with gradient :math:`g_t = \nabla f(\theta_{t-1}) / s` (``s`` = ``grad_scale``):

.. math::
   \begin{aligned}
   &\textbf{decoupled:}\;  \theta \leftarrow \theta\,(1 - \gamma_t \lambda)
        &&\text{(PyTorch's AdamW; identical to \texttt{torch.optim.AdamW})} \\
   &\textbf{independent:}\; \theta \leftarrow \theta\,(1 - \lambda\,\gamma_t / \gamma_{max})
        &&\text{(Loshchilov \& Hutter: decay follows the schedule, not the peak lr)} \\
   &\textbf{l2:}\;  g_t \leftarrow g_t + \lambda\,\theta
        &&\text{(Adam + L2, the baseline AdamW was compared against)} \\
   &m_t = \beta_1 m_{t-1} + (1-\beta_1)\,g_t, \qquad v_t = \beta_2 v_{t-1} + (1-\beta_2)\,g_t^2 \\
   &\theta \leftarrow \theta - \frac{\gamma_t}{1-\beta_1^t}\;
        \frac{m_t}{\sqrt{v_t}/\sqrt{1-\beta_2^t} + \epsilon}
   \end{aligned}

Three implementations:

* :func:`adamw_reference` -- a plain for-loop, written to be read; the ground truth of the tests. Its arithmetic
  is operation-for-operation ``torch.optim.AdamW(foreach=False)``.
* :func:`adamw_foreach` -- ``torch._foreach_*`` multi-tensor ops (``torch.optim.AdamW(foreach=True)``).
* :func:`adamw_fused` -- ``torch._fused_adamw_`` / ``torch._fused_adam_`` (CPU and CUDA): one pass over memory.
  All three decay modes map onto them exactly: *decoupled* is ``_fused_adamw_`` with :math:`\lambda`,
  *independent* is ``_fused_adamw_`` with :math:`\lambda/\gamma_{max}`, *l2* is ``_fused_adam_`` with
  :math:`\lambda`.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

__all__ = [
    "DECAY_MODES",
    "sum_of_squares",
    "lazy_adamw_rows",
    "catch_up_decay",
    "adamw",
    "adamw_reference",
    "adamw_foreach",
    "adamw_fused",
    "fused_supported",
    "effective_weight_decay",
]

DECAY_MODES = ("decoupled", "independent", "l2")


def effective_weight_decay(decay: str, weight_decay: float, lr_max: float | None) -> float:
    """The decoupled coefficient ``w`` such that the decay step is ``theta *= 1 - lr * w``.

    ``decoupled``: ``w = lambda``; ``independent``: ``w = lambda / lr_max``. (``l2`` has no decoupled form.)
    """
    if decay == "independent":
        if lr_max is None or lr_max <= 0:
            raise ValueError(f"decay='independent' needs lr_max > 0 (the group's initial lr), got {lr_max}")
        return weight_decay / lr_max
    return weight_decay


def _scalar(x) -> float:
    return x.item() if isinstance(x, Tensor) else float(x)


def adamw_reference(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    steps: list[Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    decay: str = "decoupled",
    lr_max: float | None = None,
    grad_scale: float | Tensor | None = None,
    found_inf: Tensor | None = None,
) -> None:
    """Readable for-loop AdamW with the three decay modes (see the module docstring for the math)."""
    if decay not in DECAY_MODES:
        raise ValueError(f"Unknown decay mode {decay!r}; expected one of {DECAY_MODES}")
    if found_inf is not None and found_inf.item():  # the reference may read the host; the fused kernel does not
        return
    for p, g, m, v, step in zip(params, grads, exp_avgs, exp_avg_sqs, steps, strict=True):
        step += 1
        t = _scalar(step)
        if grad_scale is not None:
            g = g / grad_scale
        if weight_decay != 0:
            if decay == "l2":
                g = g.add(p, alpha=weight_decay)
            else:
                p.mul_(1 - lr * effective_weight_decay(decay, weight_decay, lr_max))
        m.lerp_(g, 1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        bias_correction1 = 1 - beta1**t
        bias_correction2 = 1 - beta2**t
        step_size = lr / bias_correction1
        denom = (v.sqrt() / bias_correction2**0.5).add_(eps)
        p.addcdiv_(m, denom, value=-step_size)


def adamw_foreach(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    steps: list[Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    decay: str = "decoupled",
    lr_max: float | None = None,
    grad_scale: float | Tensor | None = None,
    found_inf: Tensor | None = None,
) -> None:
    """Multi-tensor AdamW (``torch._foreach_*``), same math and signature as :func:`adamw_reference`."""
    if decay not in DECAY_MODES:
        raise ValueError(f"Unknown decay mode {decay!r}; expected one of {DECAY_MODES}")
    if not params:
        return
    if found_inf is not None and found_inf.item():  # (as torch's non-capturable foreach, this kernel reads steps)
        return
    torch._foreach_add_(steps, 1)
    if grad_scale is not None:
        grads = torch._foreach_div(grads, _scalar(grad_scale))
    if weight_decay != 0:
        if decay == "l2":
            grads = torch._foreach_add(grads, params, alpha=weight_decay)
        else:
            torch._foreach_mul_(params, 1 - lr * effective_weight_decay(decay, weight_decay, lr_max))
    torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)
    del grads
    ts = [_scalar(s) for s in steps]
    step_sizes = [-(lr / (1 - beta1**t)) for t in ts]
    bias_correction2_sqrt = [(1 - beta2**t) ** 0.5 for t in ts]
    denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denom, bias_correction2_sqrt)
    torch._foreach_add_(denom, eps)
    torch._foreach_addcdiv_(params, exp_avgs, denom, step_sizes)


def adamw_fused(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    steps: list[Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    decay: str = "decoupled",
    lr_max: float | None = None,
    grad_scale: float | Tensor | None = None,
    found_inf: Tensor | None = None,
) -> None:
    """One-pass AdamW with ``torch._fused_adamw_`` / ``torch._fused_adam_``; same signature as the others."""
    if decay not in DECAY_MODES:
        raise ValueError(f"Unknown decay mode {decay!r}; expected one of {DECAY_MODES}")
    if not params:
        return
    if grad_scale is not None and not isinstance(grad_scale, Tensor):
        grad_scale = torch.full((), float(grad_scale), dtype=torch.float32, device=params[0].device)
    elif grad_scale is not None:
        grad_scale = grad_scale.to(device=params[0].device, dtype=torch.float32)
    if found_inf is not None:
        found_inf = found_inf.to(device=params[0].device, dtype=torch.float32)
    torch._foreach_add_(steps, 1)
    if decay == "l2":
        fn, wd = torch._fused_adam_, weight_decay
    else:
        fn, wd = torch._fused_adamw_, effective_weight_decay(decay, weight_decay, lr_max)
    fn(
        params,
        grads,
        exp_avgs,
        exp_avg_sqs,
        [],
        steps,
        lr=lr,
        beta1=beta1,
        beta2=beta2,
        weight_decay=wd,
        eps=eps,
        amsgrad=False,
        maximize=False,
        grad_scale=grad_scale,
        found_inf=found_inf,
    )
    if found_inf is not None:  # skipped on the device: undo the step count too (as torch's fused AdamW does)
        torch._foreach_sub_(steps, [found_inf] * len(steps))


_FUSED_DEVICE_TYPES = ("cpu", "cuda", "xpu", "mps")


def fused_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``torch._fused_adamw_`` handles tensors of this device type and dtype."""
    if device.type not in _FUSED_DEVICE_TYPES:
        return False
    if device.type == "mps":
        return dtype in (torch.float32, torch.float16)
    return dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16)


KERNELS: dict[str, Callable[..., None]] = {
    "reference": adamw_reference,
    "foreach": adamw_foreach,
    "fused": adamw_fused,
}


_TENSOR_ARGS = ("params", "grads", "exp_avgs", "exp_avg_sqs", "steps")


def _fused_layout_ok(p: Tensor, *others: Tensor) -> bool:
    """The fused kernels walk a param, its grad and its moments as one flat run of memory: all must have the
    param's strides, and the param must be dense (no gaps, no overlap) -- else they pair up the wrong elements."""
    if not p.is_contiguous() and not _dense(p):
        return False
    return all(t.shape == p.shape and t.stride() == p.stride() for t in others)


def _dense(t: Tensor) -> bool:
    """Non-overlapping and dense: some permutation of the dims is contiguous (e.g. a transpose, channels_last)."""
    expected = 1
    for size, stride in sorted(((sz, st) for sz, st in zip(t.shape, t.stride()) if sz != 1), key=lambda d: d[1]):
        if stride != expected:
            return False
        expected *= size
    return True


def adamw(*args, impl: str = "auto", **kwargs) -> None:
    """Dispatch to a kernel: ``impl`` in ``{"auto", "fused", "foreach", "reference"}``.

    ``auto`` picks ``fused`` where :func:`fused_supported` says so and every param, grad and moment share one dense
    layout (same strides: :func:`_fused_layout_ok`), else ``foreach`` -- as ``torch.optim`` never picks fused by
    itself. ``fused`` asked for explicitly with tensors of mismatched layouts runs on contiguous copies of those,
    written back into the params and moments afterwards.
    """
    if len(args) > len(_TENSOR_ARGS):
        raise TypeError(f"adamw() takes {len(_TENSOR_ARGS)} positional tensor lists, got {len(args)} positional args")
    kwargs = {**dict(zip(_TENSOR_ARGS, args)), **kwargs}
    params = kwargs["params"]
    if impl not in ("auto", *KERNELS):
        raise ValueError(f"Unknown impl {impl!r}; expected 'auto' or one of {sorted(KERNELS)}")
    if not params:
        return
    lists = [kwargs[k] for k in _TENSOR_ARGS[:4]]
    if impl in ("auto", "fused"):
        odd = [i for i, ts in enumerate(zip(*lists)) if not _fused_layout_ok(*ts)]
        if impl == "auto":
            impl = "fused" if not odd and fused_supported(params[0].device, params[0].dtype) else "foreach"
        elif odd:
            copies = [list(ts) for ts in lists]
            for i in odd:
                for ts in copies:
                    ts[i] = ts[i].contiguous()
            kwargs.update(zip(_TENSOR_ARGS, copies))
            adamw_fused(**kwargs)
            back = (0, 2, 3)  # params, exp_avgs, exp_avg_sqs were updated (grads only read)
            torch._foreach_copy_([lists[k][i] for k in back for i in odd], [copies[k][i] for k in back for i in odd])
            return
    KERNELS[impl](**kwargs)


# ----------------------------------------------------------------------------------------------------- LOMO
def sgd(
    params: list[Tensor],
    grads: list[Tensor],
    steps: list[Tensor],
    *,
    lr: float,
    weight_decay: float,
    decay: str = "decoupled",
    lr_max: float | None = None,
    grad_scale: float | Tensor | None = None,
    found_inf: Tensor | None = None,
) -> None:
    r"""The LOMO rule (Lv et al., 2024): plain SGD, :math:`\theta \leftarrow \theta - \gamma_t g`, with the
    same three decay modes as AdamW (LOMO itself decays decoupled: :math:`\theta(1 - \gamma_t\lambda)` first).
    Foreach ops; ``steps`` are counted (no bias correction needs them, checkpoints and schedules do).
    ``found_inf`` (0-d, 0 or 1) skips the update on the device: the step size and the decay become 0."""
    if decay not in DECAY_MODES:
        raise ValueError(f"Unknown decay mode {decay!r}; expected one of {DECAY_MODES}")
    if not params:
        return
    if grad_scale is not None:
        grads = torch._foreach_div(grads, grad_scale if isinstance(grad_scale, Tensor) else float(grad_scale))
    if weight_decay != 0 and decay == "l2":
        grads = torch._foreach_add(grads, params, alpha=weight_decay)
    w = effective_weight_decay(decay, weight_decay, lr_max) if weight_decay != 0 and decay != "l2" else 0.0
    if found_inf is None:
        torch._foreach_add_(steps, 1)
        if w:
            torch._foreach_mul_(params, 1 - lr * w)
        torch._foreach_add_(params, grads, alpha=-lr)
        return
    keep = 1.0 - found_inf.to(device=params[0].device, dtype=torch.float32)
    torch._foreach_add_(steps, [keep] * len(steps))
    if w:
        torch._foreach_mul_(params, 1.0 - lr * w * keep)
    torch._foreach_add_(params, torch._foreach_mul(grads, -lr * keep))


# -------------------------------------------------------------------------------------------------- AdaLomo
#
# AdaLomo (Lv et al., 2023, "AdaLomo: Low-memory Optimization with Adaptive Learning Rate"), per parameter θ with
# gradient g at step t (t counts from 1), decay_rate = -0.8, eps = (1e-30, 1e-3), clip_threshold d = 1:
#
#     β₂ = 1 - t^decay_rate,   u = g² + eps₀
#     matrices (the last two dims, batched over leading dims, e.g. fused MoE experts [E, out, in]):
#         R ← β₂ R + (1-β₂) mean(u, -1);   C ← β₂ C + (1-β₂) mean(u, -2)
#         v̂ = (R / mean(R, -1))[..., :, None] · C[..., None, :]
#     vectors:  V ← β₂ V + (1-β₂) u;   v̂ = V
#     û = g / sqrt(v̂);   û ← û / max(1, RMS(û) / d)               (grouped update normalisation, per parameter)
#     γ = lr_t · max(eps₁, RMS(θ));   θ ← θ(1 - γλ);   θ ← θ - γ û
#
# Sharded, a rank owns a contiguous range of θ's flattened elements, cutting rows arbitrarily. The functions below
# work on such a range: ``factored_partial_sums`` gives the rank's partial row/column sums (summed over ranks they
# are the full sums, so R and C stay replicated and identical everywhere), ``factored_scale`` applies
# rsqrt(R/mean R)[row] · rsqrt(C)[col] to the range.


def _segments(lo: int, n: int, shape: tuple[int, ...]):
    """Split the flat range [lo, lo+n) of a tensor of ``shape`` (>= 2-D, viewed as [B, R, C]) into pieces that lie
    in one matrix row or cover whole rows of one batch: yields (start, length, row, batch, col0, full_rows)."""
    C = shape[-1]
    R = shape[-2]
    pos, end = lo, lo + n
    while pos < end:
        row, col = divmod(pos, C)
        b = row // R
        if col or end - pos < C:  # a piece of one row
            take = min(C - col, end - pos)
            yield pos - lo, take, row, b, col, 0
            pos += take
        else:  # whole rows, up to the end of this batch (matrix) or of the range
            rows = min((end - pos) // C, (b + 1) * R - row)
            yield pos - lo, rows * C, row, b, 0, rows
            pos += rows * C


def factored_partial_sums(u: Tensor, lo: int, shape: tuple[int, ...]) -> tuple[Tensor, Tensor]:
    """Row sums ([B*R]) and column sums ([B*C]) of ``u`` (the flat range [lo, lo+len) of a [..., R, C] tensor),
    zero where the range has no elements."""
    C, R = shape[-1], shape[-2]
    B = math.prod(shape[:-2])
    rows = torch.zeros(B * R, dtype=u.dtype, device=u.device)
    cols = torch.zeros(B * C, dtype=u.dtype, device=u.device)
    for start, length, row, b, col, full in _segments(lo, u.numel(), shape):
        piece = u[start : start + length]
        if full:
            block = piece.view(full, C)
            rows[row : row + full] += block.sum(1)
            cols[b * C : (b + 1) * C] += block.sum(0)
        else:
            rows[row] += piece.sum()
            cols[b * C + col : b * C + col + length] += piece
    return rows, cols


def factored_scale(x: Tensor, lo: int, shape: tuple[int, ...], row_factor: Tensor, col_factor: Tensor) -> None:
    """In place: x[k] *= row_factor[row(k)] * col_factor[batch(k), col(k)] for the flat range x = [lo, lo+len)."""
    C = shape[-1]
    for start, length, row, b, col, full in _segments(lo, x.numel(), shape):
        piece = x[start : start + length]
        if full:
            block = piece.view(full, C)
            block.mul_(row_factor[row : row + full].unsqueeze(1)).mul_(col_factor[b * C : (b + 1) * C].unsqueeze(0))
        else:
            piece.mul_(row_factor[row]).mul_(col_factor[b * C + col : b * C + col + length])


def adalomo_beta2(step: float, decay_rate: float = -0.8) -> float:
    """β₂ at step ``step`` (counted from 1): 1 - t^decay_rate (0 at t = 1: the first estimate is g² itself)."""
    return 1.0 - math.pow(step, decay_rate)


def clip_coefficient(total_norm: float, max_norm: float | None) -> float:
    """``min(1, max_norm / (total_norm + 1e-6))`` -- the factor ``torch.nn.utils.clip_grad_norm_`` applies."""
    if max_norm is None or not math.isfinite(total_norm):
        return 1.0
    return min(1.0, max_norm / (total_norm + 1e-6))


def sum_of_squares(tensors: list[Tensor], device: torch.device) -> Tensor:
    """sum(t.square().sum()) over the tensors, as a 0-d float64 tensor on ``device`` (no host read): ``dot``
    (BLAS, one read at full memory bandwidth) for fp32/fp64, ``_foreach_norm`` accumulating in fp32 for half
    precision."""
    parts = []
    wide = [t.reshape(-1) for t in tensors if t.dtype in (torch.float32, torch.float64) and t.numel()]
    narrow = [t for t in tensors if t.dtype not in (torch.float32, torch.float64) and t.numel()]
    if wide:
        parts.append(torch.stack([torch.dot(t, t).double() for t in wide]).sum())
    if narrow:
        parts.append(torch.stack(torch._foreach_norm(narrow, 2, dtype=torch.float32)).double().square().sum())
    if not parts:
        return torch.zeros((), dtype=torch.float64, device=device)
    out = sum(parts)
    return out if out.device == device else out.to(device)


def catch_up_decay(theta: Tensor, decay_mark: Tensor, log_decay: float, mask: Tensor | None = None) -> None:
    r"""Give rows of ``theta`` (``[rows, D]``) the decoupled decay they missed since their ``decay_mark``:
    :math:`	heta_r \leftarrow 	heta_r\,e^{L - \mathrm{mark}_r}` (only where ``mask``, when given)."""
    factor = torch.exp(log_decay - decay_mark)
    if mask is not None:
        factor = torch.where(mask, factor, 1.0)
    theta.mul_(factor.to(theta.dtype).unsqueeze(1))


def lazy_adamw_rows(theta: Tensor, g: Tensor, m: Tensor, v: Tensor, step: Tensor, decay_mark: Tensor, mask: Tensor,
                    *, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float, decay: str,
                    lr_max: float | None, log_decay_before: float, log_factor: float, catchup: bool) -> None:
    r"""SparseAdamW's lazy AdamW over ``[rows, D]`` tensors: rows where ``mask`` is set take an AdamW step with
    their own step count (``step``, per row); the others stay bit-for-bit unchanged (multiplied by 1, added 0).
    Vectorised with the mask on the device: no host read, no Python loop over rows.

    Catch-up decay (``catchup``, decoupled / independent decay): a returning row first gets the decay it missed
    while idle, :math:`e^{L_{t-1} - \mathrm{mark}_r}` with ``log_decay_before`` :math:`= L_{t-1}`, then this
    step's :math:`1 - \gamma w`; its ``decay_mark`` becomes :math:`L_{t-1} + \log(1-\gamma w)` (``log_factor``).
    ``decay="l2"`` adds :math:`\lambda\theta` to the gradient instead (no catch-up). Test reference: the per-row
    loop in tests/reference_sparse.py."""
    col = lambda x: x.to(theta.dtype).unsqueeze(1)  # noqa: E731 - a [rows] factor as a [rows, 1] column
    if weight_decay and decay != "l2":
        if catchup:  # the decoupled decay each returning row missed while idle: exp(L_{t-1} - mark)
            catch_up_decay(theta, decay_mark, log_decay_before, mask)
        w = effective_weight_decay(decay, weight_decay, lr_max)
        theta.mul_(col(torch.where(mask, 1.0 - lr * w, 1.0)))
    elif weight_decay:
        g = g.add(theta, alpha=weight_decay)
    step.add_(mask.to(step.dtype))
    t = step.clamp(min=1).double()
    bc1, bc2 = 1 - beta1**t, 1 - beta2**t
    m.lerp_(g.to(m.dtype), col(mask * (1 - beta1)).to(m.dtype))
    v.mul_(col(torch.where(mask, beta2, 1.0)).to(v.dtype))
    v.addcmul_(g.to(v.dtype), (g * col(mask)).to(v.dtype), value=1 - beta2)
    denom = (v.sqrt() / col(bc2.sqrt()).to(v.dtype)).add_(eps)
    theta.addcdiv_((m * col(torch.where(mask, -lr / bc1, 0.0)).to(m.dtype)).to(theta.dtype), denom.to(theta.dtype))
    if decay != "l2":
        decay_mark.copy_(torch.where(mask, log_decay_before + log_factor, decay_mark))
