"""DeepSpeed ZeRO with a zeroadamw client optimizer (README example).

    torchrun --nproc_per_node 2 examples/deepspeed_zero.py     # or: deepspeed --num_gpus 2 examples/deepspeed_zero.py
On CPU, DeepSpeed runs over gloo.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before importing deepspeed: no accelerator probe, no banner
import deepspeed  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
rank = torch.distributed.get_rank()
torch.manual_seed(0)
model = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))
starts = torch.randint(0, 128, (32, 1), generator=torch.Generator().manual_seed(1 + rank))  # each rank its own data
batches = ((starts + torch.arange(32)) % 128).split(4)

# [readme:start]
from zeroadamw.integrations.deepspeed import check_config, client_optimizer

ds_config = check_config({                       # refuses, with the fix, what would not use our optimizer
    "train_micro_batch_size_per_gpu": 4, "gradient_clipping": 1.0, "steps_per_print": 10**6,
    "zero_optimization": {"stage": 2},           # no "optimizer" block: zeroadamw is the optimizer
    "zero_allow_untested_optimizer": True,
})
opt = client_optimizer(model.parameters(), ds_config, lr=3e-3, weight_decay=0.1, decay="decoupled")
engine, opt, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=ds_config)
for ids in batches:
    loss = engine(input_ids=ids.to(engine.device), labels=ids.to(engine.device)).loss
    engine.backward(loss)
    engine.step()
# [readme:end]
if rank == 0:
    print(f"DeepSpeed ZeRO-2, {torch.distributed.get_world_size()} process(es), client optimizer "
          f"{type(opt.optimizer).__name__}: loss {loss.item():.3f} after {len(batches)} steps")
