#!/usr/bin/env bash
# LoRA fine-tune: only the adapters are trainable, and only they are sharded (the frozen base costs no optimizer
# memory).   bash launch/lora.sh meta-llama/Llama-3.2-1B data.txt [flags]
set -euo pipefail
cd "$(dirname "$0")/.."
model=${1:?model name or path}; data=${2:?dataset}; shift 2
exec accelerate launch --config_file configs/ddp.yaml launch/finetune_llama.py \
  --model_name_or_path "$model" --dataset "$data" --torch_dtype bfloat16 --lora --lora_r 16 --lora_alpha 32 \
  --optimizer zeroadamw --stage 2 --learning_rate 2e-4 --lr_scheduler_type cosine --warmup_steps 0.03 \
  --per_device_train_batch_size 8 --block_size 2048 --gradient_checkpointing true --output_dir out/lora "$@"
