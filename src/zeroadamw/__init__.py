"""zeroadamw: the AdamW layer for LLM fine-tuning -- ZeRO sharding, sparse/MoE awareness, step-in-backward.

Imports only torch. Integrations with transformers / accelerate / deepspeed / peft live in
``zeroadamw.integrations`` and are imported lazily.
"""

from .adamw import AdamW
from .functional import DECAY_MODES
from .sharded_adamw import DEFAULT_BUCKET_SIZE, ShardedAdamW
from .sparse_adamw import SparseAdamW, moe_param_groups

__version__ = "0.1.0"

__all__ = ["ShardedAdamW", "SparseAdamW", "AdamW", "moe_param_groups", "DECAY_MODES", "DEFAULT_BUCKET_SIZE",
           "__version__"]
