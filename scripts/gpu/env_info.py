"""GPU tier, section "env": the machine and the software the other sections run on (and a CUDA smoke test)."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

from common import ROOT, emit, ensure_src_on_path, module_version


def sh(cmd: list[str], timeout: float = 20) -> str:
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
        return (r.stdout + r.stderr).strip()
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"({' '.join(cmd)}: {type(e).__name__}: {e})"


def main() -> None:
    print("== nvidia-smi ==")
    print(sh(["nvidia-smi"]))
    gpu_query = sh(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,compute_mode,mig.mode.current",
                    "--format=csv,noheader"])
    ensure_src_on_path()
    import torch

    info = {
        "python": sys.version.split()[0],
        "executable": sys.executable,
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "nvidia_smi": gpu_query,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "cuda_available": torch.cuda.is_available(),
        "git_commit": sh(["git", "rev-parse", "HEAD"]),
        "git_dirty_files": len([ln for ln in sh(["git", "status", "--porcelain"]).splitlines() if ln.strip()]),
        "env": {k: os.environ.get(k) for k in ("PYTHONPATH", "ZEROADAMW_STRICT_DEVICE", "CUDA_VISIBLE_DEVICES",
                                               "OUT", "HF_HUB_OFFLINE")},
    }
    for dist in ("transformers", "accelerate", "peft", "bitsandbytes", "lomo-optim", "pytest", "pytest-timeout",
                 "numpy", "safetensors", "tokenizers"):
        info[dist.replace("-", "_")] = module_version(dist)
    import zeroadamw

    info["zeroadamw"] = f"{zeroadamw.__version__} from {os.path.dirname(zeroadamw.__file__)}"
    status, summary = "ok", ""
    if torch.cuda.is_available():
        info["devices"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        info["capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
        free, total = torch.cuda.mem_get_info(0)
        info["memory_total_gib"] = round(total / 2**30, 1)
        info["memory_free_gib"] = round(free / 2**30, 1)
        try:
            v = torch.cuda.nccl.version()
            info["nccl"] = ".".join(map(str, v)) if isinstance(v, (tuple, list)) else str(v)
        except Exception as e:  # noqa: BLE001
            info["nccl"] = f"unavailable: {e}"
        info["nccl_available"] = torch.distributed.is_nccl_available()
        x = torch.randn(1024, 1024, device="cuda")
        y = (x @ x).sum().item()  # the smoke test: a kernel runs and a value comes back
        info["smoke"] = "matmul ok" if y == y else "matmul returned NaN"
        summary = f"{info['devices'][0]}, torch {torch.__version__}, CUDA {torch.version.cuda}"
    else:
        status, summary = "fail", "torch.cuda.is_available() is False: every CUDA test is skipped, nothing measured"
    print("== versions ==")
    for k, v in info.items():
        print(f"{k:18s} {v}")
    emit("env", status, summary, **info)


if __name__ == "__main__":
    main()
