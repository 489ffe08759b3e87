#!/usr/bin/env bash
# The same fine-tune under DeepSpeed ZeRO-2 (DeepSpeed partitions; zeroadamw's plain AdamW is its client optimizer).
#   bash launch/deepspeed_zero2.sh meta-llama/Llama-3.2-1B data.txt [flags]
set -euo pipefail
cd "$(dirname "$0")/.."
model=${1:?model name or path}; data=${2:?dataset}; shift 2
exec accelerate launch --config_file configs/zero2.yaml launch/finetune_llama.py \
  --model_name_or_path "$model" --dataset "$data" --torch_dtype bfloat16 --bf16 \
  --optimizer zeroadamw --learning_rate 2e-5 --per_device_train_batch_size 4 --block_size 2048 \
  --gradient_checkpointing true --output_dir out/ds_zero2 "$@"
