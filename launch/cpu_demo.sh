#!/usr/bin/env bash
# The README's main job on a CPU-only machine: fine-tune the embedded small LLaMA (configs/llama-tiny.json) on the
# docstrings of Python's standard library, 2 processes (gloo), ShardedAdamW stage 2. Extra flags are passed on.
set -euo pipefail
cd "$(dirname "$0")/.."
# DS_ACCELERATOR: accelerate imports DeepSpeed (when installed) to unwrap models; on this CPU run tell it "cpu"
# rather than have it probe and print "Setting accelerator to CPU" (the same choice, silently)
export ACCELERATE_USE_CPU=true OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
echo "cpu_demo: accelerate launch, 2 gloo processes on CPU, ShardedAdamW stage 2, 150 steps (~3 min on 2 cores);"
echo "cpu_demo: output in out/demo/ (config: configs/ddp_cpu.yaml, model: configs/llama-tiny.json)"
if [ "$#" -gt 0 ]; then echo "cpu_demo: extra flags (they override the above): $*"; fi
exec accelerate launch --config_file configs/ddp_cpu.yaml launch/finetune_llama.py \
  --optimizer zeroadamw --stage 2 --bucket_size 262144 \
  --max_steps 150 --per_device_train_batch_size 8 --block_size 128 \
  --learning_rate 2e-3 --lr_scheduler_type cosine --warmup_steps 15 --weight_decay 0.1 --max_grad_norm 1.0 \
  --logging_steps 10 --eval_strategy steps --eval_steps 50 --save_strategy no --report_to none \
  --output_dir out/demo "$@"
