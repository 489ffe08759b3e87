#!/usr/bin/env bash
# Full fine-tune of a LLaMA checkpoint on 8 GPUs: zeroadamw stage 2 (no DDP), bf16 weights + fp32 master shards.
#   bash launch/full.sh meta-llama/Llama-3.2-1B data.txt [more TrainingArguments flags]
set -euo pipefail
cd "$(dirname "$0")/.."
model=${1:?model name or path}; data=${2:?dataset (.txt/.jsonl file or datasets name)}; shift 2
exec accelerate launch --config_file configs/ddp.yaml launch/finetune_llama.py \
  --model_name_or_path "$model" --dataset "$data" --torch_dtype bfloat16 \
  --optimizer zeroadamw --stage 2 --max_grad_norm 1.0 \
  --per_device_train_batch_size 4 --gradient_accumulation_steps 8 --block_size 2048 \
  --learning_rate 2e-5 --lr_scheduler_type cosine --warmup_steps 0.03 --weight_decay 0.1 \
  --gradient_checkpointing true --logging_steps 10 --save_steps 500 --output_dir out/full "$@"
