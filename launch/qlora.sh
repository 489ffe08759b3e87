#!/usr/bin/env bash
# QLoRA: 4-bit NF4 base (bitsandbytes Linear4bit, bf16 compute) + LoRA adapters, sharded by zeroadamw (stage 2).
#   bash launch/qlora.sh meta-llama/Llama-3.1-8B data.txt [flags]
# Adapters are fp32 (PEFT's default); --torch_dtype bfloat16 makes them bf16 (then an fp32 master, or --kahan_sum: a
# bf16 compensation instead). Optimizer state: --state_dtype fp32 | bf16 | int8 (int8: adapters of >= 4096 elements;
# smaller ones, e.g. r x a small k/v width, keep fp32 moments -- the memory report lists both).
# On a CPU-only machine (bitsandbytes runs NF4 on CPU: checked with 0.50.2; no download: the small LLaMA of
# configs/llama-tiny.json is built, saved to OUTPUT_DIR/qlora_base/ and loaded 4-bit):
#   ACCELERATE_USE_CPU=true accelerate launch --config_file configs/ddp_cpu.yaml launch/finetune_llama.py --qlora \
#     --max_steps 20 --block_size 64 --state_dtype int8 --output_dir out/qlora_cpu
set -euo pipefail
cd "$(dirname "$0")/.."
model=${1:?model name or path}; data=${2:?dataset}; shift 2
exec accelerate launch --config_file configs/ddp.yaml launch/finetune_llama.py \
  --model_name_or_path "$model" --dataset "$data" --qlora --lora_r 16 --lora_alpha 32 \
  --optimizer zeroadamw --stage 2 --learning_rate 2e-4 --lr_scheduler_type cosine --warmup_steps 0.03 \
  --per_device_train_batch_size 4 --block_size 2048 --gradient_checkpointing true --bf16 --output_dir out/qlora "$@"
