"""zeroadamw: the AdamW layer for LLM fine-tuning -- ZeRO sharding, sparse/MoE awareness, step-in-backward.

Imports only torch. Integrations with transformers / accelerate / deepspeed / peft live in
``zeroadamw.integrations`` and are imported lazily.
"""

from .adamw import AdamW
from .functional import DECAY_MODES
from .sharded_adamw import DEFAULT_BUCKET_SIZE, ShardedAdamW

__version__ = "0.1.0"

__all__ = ["ShardedAdamW", "AdamW", "DECAY_MODES", "DEFAULT_BUCKET_SIZE", "__version__"]
