"""zeroadamw: the AdamW layer for LLM fine-tuning -- ZeRO sharding, sparse/MoE awareness, step-in-backward.

Imports only torch (>= MIN_TORCH, checked at import). Integrations with transformers / accelerate / deepspeed /
peft live in ``zeroadamw.integrations`` and are imported lazily.
"""

from __future__ import annotations

from ._torch_version import MIN_TORCH, check_torch_version, parse_torch_version

import torch as _torch  # noqa: E402

check_torch_version(_torch.__version__)

from .adamw import AdamW  # noqa: E402
from .functional import DECAY_MODES  # noqa: E402
from .mesh import mesh_from_env  # noqa: E402
from .sharded_adamw import DEFAULT_BUCKET_SIZE, ShardedAdamW  # noqa: E402
from .sparse_adamw import SparseAdamW, moe_param_groups  # noqa: E402

__version__ = "0.1.0"

__all__ = ["ShardedAdamW", "SparseAdamW", "AdamW", "moe_param_groups", "mesh_from_env", "DECAY_MODES", "DEFAULT_BUCKET_SIZE",
           "MIN_TORCH", "check_torch_version", "parse_torch_version", "__version__"]
