#!/usr/bin/env bash
# Multi-node fine-tune with a hierarchical mesh (--mesh hierarchical): one torchrun per node, c10d rendezvous.
# The ranks of a node shard the optimizer state (reduce-scatter / all-gather over intra-node links), the nodes
# replicate it (an all-reduce of 1/GPUS_PER_NODE of the gradient bytes over the inter-node links).
#
#   bash launch/multinode_torchrun.sh local [flags]
#       Two "nodes" on this machine: two torchrun launchers of 2 CPU processes each (gloo), the embedded small
#       LLaMA on Python's docstrings -- what tests/test_multinode.py runs. Checked on CPU; output in
#       out/multinode/ (comm_bytes.json: one step's bytes per mesh dimension against the model).
#
#   MASTER_ADDR=<host of node 0> NODE_RANK=<0|1> bash launch/multinode_torchrun.sh node [flags]
#       The real form, on each of NNODES hosts (default 2) with GPUS_PER_NODE GPUs (default: nvidia-smi's
#       count): the same command on every host, MASTER_ADDR = the first host (it hosts the rendezvous on
#       MASTER_PORT, default 29500, which the others must reach), RDZV_ID the same on all (default
#       zeroadamw-multinode). UNTESTED HERE on GPUs and on two hosts (checked only on CPU, both "hosts" on this
#       machine: MASTER_ADDR=127.0.0.1 GPUS_PER_NODE=2, NODE_RANK=0 and 1). Pass the model, data and training flags,
#       e.g. --model_name_or_path meta-llama/Llama-3.2-1B --dataset data.txt --bf16 --max_steps 1000
#       --output_dir out/llama_2x8 (the output directory on a shared filesystem: checkpoints are written by
#       global rank 0 -- model, scheduler -- and by every rank -- its optimizer shard --, and a resume reads them
#       all; without one, add --save_on_each_node true and resume from the same layout).
#
# Extra flags are passed on to launch/finetune_llama.py (a repeated flag: the last one wins).
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:-}
case "$mode" in local | node) shift ;; *)
  echo "usage: $0 local [flags]   |   MASTER_ADDR=host0 NODE_RANK=r $0 node [flags]" >&2; exit 2 ;;
esac
TORCHRUN=${TORCHRUN:-$(command -v torchrun || echo .venv/bin/torchrun)}  # on PATH, else the repo's venv
MASTER_PORT=${MASTER_PORT:-29500}
RDZV_ID=${RDZV_ID:-zeroadamw-multinode}

if [ "$mode" = local ]; then
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
  echo "multinode (local): 2 torchrun launchers x 2 CPU processes (gloo) = a 2 x 2 (replicate x shard) mesh;"
  echo "multinode (local): output in out/multinode/, node logs in out/multinode/node{0,1}.log"
  mkdir -p out/multinode
  pids=()
  trap 'for p in "${pids[@]}"; do kill -- -"$p" 2>/dev/null || true; done' EXIT INT TERM
  for node in 0 1; do
    # each launcher in its own process group (setsid), so that the trap ends it and its workers
    setsid "$TORCHRUN" --nnodes 2 --nproc_per_node 2 --node_rank "$node" \
      --rdzv-backend c10d --rdzv-endpoint "127.0.0.1:$MASTER_PORT" --rdzv-id "$RDZV_ID-$$" --max-restarts 0 \
      launch/finetune_llama.py --mesh hierarchical --optimizer zeroadamw --stage 2 --bucket_size 262144 \
      --max_steps 30 --per_device_train_batch_size 4 --block_size 64 --gradient_accumulation_steps 2 \
      --learning_rate 2e-3 --lr_scheduler_type cosine --warmup_steps 3 --weight_decay 0.1 --max_grad_norm 1.0 \
      --logging_steps 5 --save_steps 15 --report_to none --disable_tqdm true --output_dir out/multinode "$@" \
      > "out/multinode/node$node.log" 2>&1 &
    pids+=("$!")
  done
  rc=0
  for p in "${pids[@]}"; do wait "$p" || rc=$?; done
  pids=()
  grep -h -A4 '^communication of step' out/multinode/node0.log out/multinode/node1.log || true
  grep -h '^train loss' out/multinode/node0.log out/multinode/node1.log || true
  [ "$rc" = 0 ] || { echo "multinode (local): failed (exit $rc); see out/multinode/node{0,1}.log" >&2; exit "$rc"; }
  exit 0
fi

# node: one host of a real multi-node job (untested here)
NNODES=${NNODES:-2}
NODE_RANK=${NODE_RANK:?set NODE_RANK (0 .. NNODES-1) on each host}
MASTER_ADDR=${MASTER_ADDR:?set MASTER_ADDR to the first host (the rendezvous)}
GPUS_PER_NODE=${GPUS_PER_NODE:-$( (nvidia-smi -L 2>/dev/null || true) | wc -l)}
[ "$GPUS_PER_NODE" -gt 0 ] || { echo "no GPUs found: set GPUS_PER_NODE" >&2; exit 2; }
# c10d numbers the nodes by arrival (NODE_RANK is a hint): a node's ranks are consecutive either way, which is
# all the mesh needs (LOCAL_WORLD_SIZE = GPUS_PER_NODE ranks per shard row)
exec "$TORCHRUN" --nnodes "$NNODES" --nproc_per_node "$GPUS_PER_NODE" --node_rank "$NODE_RANK" \
  --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv-id "$RDZV_ID" \
  launch/finetune_llama.py --mesh hierarchical --optimizer zeroadamw --stage 2 "$@"
