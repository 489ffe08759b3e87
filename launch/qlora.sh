#!/usr/bin/env bash
# QLoRA: 4-bit NF4 base (bitsandbytes, CUDA only) + bf16 LoRA adapters sharded by zeroadamw.
#   bash launch/qlora.sh meta-llama/Llama-3.1-8B data.txt [flags]
set -euo pipefail
cd "$(dirname "$0")/.."
model=${1:?model name or path}; data=${2:?dataset}; shift 2
exec accelerate launch --config_file configs/ddp.yaml launch/finetune_llama.py \
  --model_name_or_path "$model" --dataset "$data" --qlora --lora_r 16 --lora_alpha 32 \
  --optimizer zeroadamw --stage 2 --learning_rate 2e-4 --lr_scheduler_type cosine --warmup_steps 0.03 \
  --per_device_train_batch_size 4 --block_size 2048 --gradient_checkpointing true --bf16 --output_dir out/qlora "$@"
