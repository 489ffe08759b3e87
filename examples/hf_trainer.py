"""HF Trainer with ShardedAdamW: ZeroTrainer, diagnostics, a sharded checkpoint and a resume (README example).

    python examples/hf_trainer.py [OUTPUT_DIR]                            # 1 process
    accelerate launch --num_processes 2 examples/hf_trainer.py [OUTPUT_DIR]   # N processes, same code

Nothing is downloaded: the model is a small LLaMA built from a config, the data a toy counting language.
"""
import sys

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

out = sys.argv[1] if len(sys.argv) > 1 else "out/hf_trainer_example"
torch.manual_seed(0)
model = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))
starts = torch.randint(0, 128, (64, 1), generator=torch.Generator().manual_seed(1))
ds = [{"input_ids": x, "labels": x} for x in (starts + torch.arange(32)) % 128]  # labels: Trainer needs a loss


def training_args(max_steps):
    return TrainingArguments(output_dir=out, max_steps=max_steps, per_device_train_batch_size=4,
                             gradient_accumulation_steps=2, learning_rate=3e-3, lr_scheduler_type="constant",
                             weight_decay=0.1, max_grad_norm=1.0, logging_steps=2, save_steps=3, report_to=[],
                             use_cpu=not torch.cuda.is_available(), dataloader_pin_memory=torch.cuda.is_available())


# [readme:start]
from zeroadamw.diagnostics import attach
from zeroadamw.integrations.hf import ZeroTrainer, ZeroTrainerMixin

trainer = ZeroTrainer(model=model, args=training_args(max_steps=3),  # max_grad_norm, gradient_accumulation_steps
                      train_dataset=ds, zeroadamw={"stage": 2})     # any ShardedAdamW argument
attach(trainer)              # diagnostics -> OUTPUT_DIR/diagnostics.jsonl; one summary line per log in the console
trainer.train()              # writes OUTPUT_DIR/checkpoint-3/ (zeroadamw_optimizer/: the sharded optimizer state)


class MyTrainer(ZeroTrainerMixin, Trainer):  # any Trainer subclass (e.g. trl.SFTTrainer): mix in first
    pass


trainer = MyTrainer(model=model, args=training_args(max_steps=6), train_dataset=ds, zeroadamw={"stage": 2})
attach(trainer)              # a resumed run keeps diagnostics.jsonl's records up to step 3 and appends
trainer.train(resume_from_checkpoint=f"{out}/checkpoint-3")  # or True: the last one; at any world size
# [readme:end]
if trainer.is_world_process_zero():
    print(f"done: trained to step {trainer.state.global_step}; checkpoints and diagnostics.jsonl in {out}/")
