"""Memory measurement helpers: peak resident memory (Linux VmHWM) and CUDA peaks, and model-state accounting."""

from __future__ import annotations

import torch

__all__ = ["reset_peak_memory", "peak_memory_bytes", "current_rss_bytes", "adamw_state_bytes", "tensor_bytes"]


def _status_field(name: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(name + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def reset_peak_memory(device: torch.device | str | None = None) -> None:
    """Reset the peak-memory counter: CUDA's allocator peak on a CUDA device, else the process's VmHWM
    (writing 5 to /proc/self/clear_refs, Linux)."""
    device = torch.device(device) if device is not None else None
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_memory_bytes(device: torch.device | str | None = None) -> int | None:
    """Peak since the last reset: ``torch.cuda.max_memory_allocated`` on CUDA, else VmHWM (peak RSS)."""
    device = torch.device(device) if device is not None else None
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device)
    return _status_field("VmHWM")


def current_rss_bytes() -> int | None:
    return _status_field("VmRSS")


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def adamw_state_bytes(params, state_dtype: torch.dtype = torch.float32, master: bool = False) -> int:
    """What ``torch.optim.AdamW`` keeps for ``params``: exp_avg + exp_avg_sq (+ an fp32 master copy)."""
    n = sum(p.numel() for p in params if p.requires_grad)
    per = torch.empty((), dtype=state_dtype).element_size()
    return n * per * 2 + (n * 4 if master else 0)
