"""Side by side, same model / batch / steps, real processes: every optimizer path at N = 1, 2, 4 ranks.

    python benchmarks/compare.py                       # the default matrix (~50M-param Llama, CPU/gloo)
    python benchmarks/compare.py --smoke               # CI: 1 step, a tiny Llama, N = 1 and 2
    python benchmarks/compare.py --device cuda --dtype bf16 --hidden 2048 --layers 16 --intermediate 5632 \\
        --vocab 32000 --seq 1024 --batch 4 --steps 20      # larger models on GPUs (NCCL)

Every (mode, N) runs in fresh processes launched with ``torchrun --standalone --nproc_per_node N`` (DeepSpeed
reads torchrun's environment in ``deepspeed.init_distributed``; no ``deepspeed`` launcher is needed for one
node); gloo on CPU, NCCL when the device is CUDA. Each process builds the same ``LlamaForCausalLM`` from a
``LlamaConfig`` (seed 0, no download), then -- after the model is built and before any optimizer, DDP or
DeepSpeed object exists -- records its memory baseline and resets the peak counter (VmHWM via
/proc/self/clear_refs on CPU; ``torch.cuda.reset_peak_memory_stats`` on GPU). It trains ``--steps`` steps on its
own batch of random tokens (rank r, step s: the same tokens in every mode) and reports, per rank:

* ``step_ms_median``: median wall time of forward + backward + step + zero_grad over steps 2.. (all steps when
  there is only one);
* ``peak_growth_bytes``: peak RSS (or CUDA allocator peak) over the whole run minus the model-built baseline
  (``peak_bytes`` is the absolute peak); ``steady_peak_growth_bytes``: the same from step 2 on;
* ``state_bytes``: the tensors in this rank's optimizer state (see ``STATE`` below; ``state_breakdown``);
* ``comm_bytes_per_step`` with ``comm_method``: ``counted`` (zeroadamw's ``comm_counters()``, DDP through a
  comm hook that counts what each bucket all-reduces) or ``computed`` (the algorithmic bytes of the algorithm
  the library runs: ZeroRedundancyOptimizer's parameter broadcasts, DeepSpeed's gradient reduction and
  parameter all-gather); for DeepSpeed one extra, untimed step runs with DeepSpeed's comms logger on and the
  logged message sizes are kept next to the computed number (``ds_comms_logged``) as a cross-check;
* ``final_loss`` (this rank's loss at the last step) and ``losses``.

Collective bytes use the ring-algorithm convention of zeroadamw.comm (bytes each rank sends): all-reduce
2(N-1)/N x size, reduce-scatter / all-gather / reduce (N-1)/N x size, a broadcast of a shard counted like the
all-gather it amounts to.

Modes (``--modes``): ``ddp_adamw`` (DDP + torch.optim.AdamW(fused=True); one process: no DDP),
``zero_redundancy`` (DDP + torch.distributed.optim.ZeroRedundancyOptimizer(AdamW fused); N = 1: a 1-process
group, no DDP), ``ds_zero1`` / ``ds_zero2`` (DeepSpeed ZeRO-1/2 with torch.optim.AdamW(fused=True) as the client
optimizer, DeepSpeed's default buckets), ``bnb_adamw8bit`` (DDP + bitsandbytes.optim.AdamW8bit), ``lomo``
(lomo_optim.Lomo, SGD fused into backward; one process only: it does not reduce gradients across ranks),
``zeroadamw_stage1`` / ``zeroadamw_stage2`` (ShardedAdamW, no DDP), ``zeroadamw_stage2_overlap`` (stage 2 with
``overlap_param_gather=True``: the all-gather is waited by the next forward), ``zeroadamw_sib``
(``step_in_backward=True``, the fused variant), ``zeroadamw_sib_clip`` (the same with ``max_grad_norm=1.0``:
exact clipping, update at step()). Every mode uses lr 1e-3, weight decay 0.1 in one param group, no clipping
(except zeroadamw_sib_clip), each library's default buckets. A row that cannot run (a library not installed,
a crash, lomo at N > 1) is kept in the output with its reason -- nothing is dropped.

Optimizer state per rank (``STATE``): torch AdamW / ZeroRedundancyOptimizer -- exp_avg + exp_avg_sq of the
params this rank steps; DeepSpeed -- the client AdamW's state on its flat fp32 partition + that fp32 partition
itself (DeepSpeed keeps a separate fp32 master partition even for an fp32 model); bitsandbytes -- its 8-bit
moments + the absmax tables + the quantisation maps (each distinct tensor once; params under its
min_8bit_size keep 32-bit moments); lomo -- none; zeroadamw -- ``state_bytes()`` (the owned shard's moments, padding
included).

On CPU the workers run with ``MALLOC_MMAP_THRESHOLD_=131072`` (``--glibc-default`` turns it off), as in
benchmarks/memory.py: with glibc's dynamic threshold, a large block freed once raises the threshold and later
freed blocks stay in the heap, so VmHWM would measure the allocator's retention (which penalises whoever frees
and reallocates most -- measured +50 to +130 MiB noise per rank there) instead of what each optimizer holds.

Output: ``--out-jsonl`` (one record per rank, or one per skipped / failed (mode, N)), ``--out-md`` (the table,
the targets as ratios measured in this run with PASS / MISS, the command and the machine), and two PNGs
(per-rank peak memory growth vs N and step time vs N, one line per mode).
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time

MODES = ["ddp_adamw", "zero_redundancy", "ds_zero1", "ds_zero2", "bnb_adamw8bit", "torchao_adamw8bit", "lomo",
         "zeroadamw_stage1", "zeroadamw_stage2", "zeroadamw_stage2_overlap", "zeroadamw_sib", "zeroadamw_sib_clip",
         "zeroadamw_stage2_bf16", "zeroadamw_stage2_int8", "zeroadamw_stage2_kahan", "zeroadamw_stage2_kahan_int8",
         "zeroadamw_sib_kahan_int8"]
# precision-aware state (ShardedAdamW options); Kahan modes only differ from the others with --dtype bf16
PRECISION = {"zeroadamw_stage2_bf16": dict(state_dtype="bf16"), "zeroadamw_stage2_int8": dict(state_dtype="int8"),
             "zeroadamw_stage2_kahan": dict(master_dtype=None, kahan_sum=True),
             "zeroadamw_stage2_kahan_int8": dict(master_dtype=None, kahan_sum=True, state_dtype="int8"),
             "zeroadamw_sib_kahan_int8": dict(master_dtype=None, kahan_sum=True, state_dtype="int8")}
LABELS = {
    "ddp_adamw": "DDP + torch AdamW (fused)",
    "zero_redundancy": "DDP + torch ZeroRedundancyOptimizer",
    "ds_zero1": "DeepSpeed ZeRO-1",
    "ds_zero2": "DeepSpeed ZeRO-2",
    "bnb_adamw8bit": "DDP + bitsandbytes AdamW8bit",
    "lomo": "lomo_optim.Lomo (SGD)",
    "zeroadamw_stage1": "zeroadamw stage 1",
    "zeroadamw_stage2": "zeroadamw stage 2",
    "zeroadamw_stage2_overlap": "zeroadamw stage 2 + overlap_param_gather",
    "zeroadamw_sib": "zeroadamw step in backward",
    "zeroadamw_sib_clip": "zeroadamw step in backward + clip",
    "torchao_adamw8bit": "DDP + torchao AdamW8bit",
    "zeroadamw_stage2_bf16": "zeroadamw stage 2, bf16 moments",
    "zeroadamw_stage2_int8": "zeroadamw stage 2, int8 moments",
    "zeroadamw_stage2_kahan": "zeroadamw stage 2, Kahan (no master)",
    "zeroadamw_stage2_kahan_int8": "zeroadamw stage 2, Kahan + int8 moments",
    "zeroadamw_sib_kahan_int8": "zeroadamw step in backward, Kahan + int8 moments",
}
NEEDS = {"ds_zero1": "deepspeed", "ds_zero2": "deepspeed", "bnb_adamw8bit": "bitsandbytes", "lomo": "lomo_optim",
         "torchao_adamw8bit": "torchao"}
ZERO_MODES = ["zeroadamw_stage1", "zeroadamw_stage2", "zeroadamw_stage2_overlap", "zeroadamw_sib",
              "zeroadamw_sib_clip"]
LR, WD = 1e-3, 0.1

# the default model: a ~50M-param Llama (fp32) -- sized so that the whole matrix runs in < 15 min on 2 CPU cores
DEFAULTS = dict(hidden=640, layers=8, intermediate=1728, heads=10, kv_heads=10, vocab=8000, seq=128, batch=2,
                steps=5, world_sizes=[1, 2, 4])
SMOKE = dict(hidden=64, layers=2, intermediate=176, heads=4, kv_heads=4, vocab=512, seq=32, batch=2, steps=1,
             world_sizes=[1, 2])


# ------------------------------------------------------------------------------------------------- worker
def _tensor_bytes(tensors) -> int:
    """Bytes of distinct tensors (a tensor shared by several state entries -- bnb's quantisation map -- once)."""
    import torch

    seen, total = set(), 0
    for t in tensors:
        if not torch.is_tensor(t) or t.numel() == 0:
            continue
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel(), t.dtype)
        if key in seen:
            continue
        seen.add(key)
        total += t.numel() * t.element_size()
    return total


def _state_tensors(state: dict, skip=("step",)):
    import torch

    for st in state.values():
        for k, t in st.items():
            if k not in skip and torch.is_tensor(t):
                yield t


def _ring(op: str, nbytes: float, world: int) -> float:
    """Algorithmic bytes one rank sends (ring algorithms), the convention of zeroadamw.comm."""
    if world <= 1:
        return 0.0
    f = (world - 1) / world
    return {"all_reduce": 2 * f, "reduce_scatter": f, "all_gather": f, "reduce": f, "broadcast": f}[op] * nbytes


def worker(args) -> None:
    import torch
    import torch.distributed as dist
    from transformers import LlamaConfig, LlamaForCausalLM

    from zeroadamw.memory import current_rss_bytes, peak_memory_bytes, reset_peak_memory

    mode = args.mode
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    cuda = args.device == "cuda"
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    backend = "nccl" if cuda else "gloo"
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]

    # libraries first, so that their import is part of the baseline of every mode
    ds_cfg, lazy_import_bytes = None, None
    if mode.startswith("ds_"):
        import deepspeed

        deepspeed.init_distributed(dist_backend=backend)
        ds_cfg = {"train_micro_batch_size_per_gpu": args.batch, "gradient_accumulation_steps": 1,
                  "gradient_clipping": 0.0, "zero_optimization": {"stage": int(mode[-1])},
                  "zero_allow_untested_optimizer": True, "zero_force_ds_cpu_optimizer": False,
                  "steps_per_print": 10**9, "wall_clock_breakdown": False}
        if args.dtype == "bf16":
            ds_cfg["bf16"] = {"enabled": True}
        # deepspeed.initialize imports ~570 modules lazily (torch._inductor, networkx, ...: +46 MiB RSS on CPU);
        # a throwaway engine on an 8 x 8 Linear imports them before the baseline, so that they are not counted
        # as optimizer memory (the number is recorded as lazy_import_bytes)
        gc.collect()
        r0 = torch.cuda.memory_allocated(device) if cuda else current_rss_bytes()
        warm = torch.nn.Linear(8, 8).to(device=device, dtype=dtype)
        warm_engine, *_ = deepspeed.initialize(model=warm, optimizer=torch.optim.AdamW(warm.parameters()),
                                               config=ds_cfg)
        del warm_engine, warm, _
        gc.collect()
        lazy_import_bytes = (torch.cuda.memory_allocated(device) if cuda else current_rss_bytes()) - r0
    elif mode == "bnb_adamw8bit":
        import bitsandbytes as bnb
    elif mode == "torchao_adamw8bit":
        from torchao.optim import AdamW8bit as AoAdamW8bit
    elif mode == "lomo":
        from lomo_optim import Lomo
    if not dist.is_initialized() and (mode == "zero_redundancy" or world > 1):
        dist.init_process_group(backend)
    from zeroadamw import ShardedAdamW

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                      num_hidden_layers=args.layers, num_attention_heads=args.heads,
                      num_key_value_heads=args.kv_heads, max_position_embeddings=args.seq,
                      tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).to(device=device, dtype=dtype)
    if args.grad_ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    n_params = sum(p.numel() for p in params)
    elem = params[0].element_size()

    gc.collect()
    baseline = torch.cuda.memory_allocated(device) if cuda else current_rss_bytes()
    reset_peak_memory(device)

    # ---- the optimizer path ------------------------------------------------------------------------------
    fwd = model
    opt = engine = lomo = None
    ddp_count = [0.0]
    notes = []

    def wrap_ddp():
        from torch.nn.parallel import DistributedDataParallel as DDP

        ddp = DDP(model, device_ids=[device.index] if cuda else None)

        def counting_allreduce(state, bucket):  # what the default hook does, plus a byte count
            buf = bucket.buffer()
            ddp_count[0] += _ring("all_reduce", buf.numel() * buf.element_size(), world)
            return dist.all_reduce(buf.div_(world), async_op=True).get_future().then(lambda f: f.value()[0])

        ddp.register_comm_hook(None, counting_allreduce)
        return ddp

    if mode == "ddp_adamw":
        if world > 1:
            fwd = wrap_ddp()
        opt = torch.optim.AdamW(params, lr=LR, weight_decay=WD, fused=True)
    elif mode == "zero_redundancy":
        from torch.distributed.optim import ZeroRedundancyOptimizer

        if world > 1:
            fwd = wrap_ddp()
        opt = ZeroRedundancyOptimizer(params, optimizer_class=torch.optim.AdamW, lr=LR, weight_decay=WD, fused=True)
    elif mode == "bnb_adamw8bit":
        if world > 1:
            fwd = wrap_ddp()
        opt = bnb.optim.AdamW8bit(params, lr=LR, weight_decay=WD)
    elif mode == "torchao_adamw8bit":  # torch.compile'd step: the first steps compile (excluded by the median)
        if world > 1:
            fwd = wrap_ddp()
        opt = AoAdamW8bit(params, lr=LR, weight_decay=WD)
    elif mode == "lomo":
        lomo = Lomo(model, lr=LR, weight_decay=WD)
    elif mode.startswith("ds_"):
        client = torch.optim.AdamW(params, lr=LR, weight_decay=WD, fused=True)
        engine, opt, _, _ = deepspeed.initialize(model=model, optimizer=client, config=ds_cfg)
        fwd = engine
    else:
        opt = ShardedAdamW(params, lr=LR, weight_decay=WD, stage=1 if mode == "zeroadamw_stage1" else 2,
                           step_in_backward=mode.startswith("zeroadamw_sib"),
                           max_grad_norm=1.0 if mode == "zeroadamw_sib_clip" else None,
                           overlap_param_gather=mode.endswith("_overlap"), **PRECISION.get(mode, {}),
                           **({"bucket_size": args.bucket_size} if args.bucket_size else {}))

    gc.collect()
    built = (torch.cuda.memory_allocated(device) if cuda else current_rss_bytes()) - baseline  # wrappers, buckets

    def batch(step):
        g = torch.Generator().manual_seed(step * 1000 + rank)
        return torch.randint(0, args.vocab, (args.batch, args.seq), generator=g).to(device)

    def one_step(step):
        ids = batch(step)
        if engine is not None:
            loss = engine(input_ids=ids, labels=ids).loss
            engine.backward(loss)
            engine.step()
        elif lomo is not None:
            loss = model(input_ids=ids, labels=ids).loss
            lomo.fused_backward(loss, LR)
        else:
            loss = fwd(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return loss

    times, losses = [], []
    first_peak = None
    for step in range(args.steps):
        if step == 1:  # from here on every optimizer holds its state: the steady-state peak
            first_peak = peak_memory_bytes(device)
            reset_peak_memory(device)
        if cuda:
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        loss = one_step(step)
        if cuda:
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
        if step == 0 and args.steps > 1:  # count collectives from the second step on (the first has set-up traffic)
            ddp_count[0] = 0.0
            if isinstance(opt, ShardedAdamW):
                opt.reset_comm_counters()
    last_peak = peak_memory_bytes(device)
    peak = max(last_peak, first_peak or 0)
    counted_steps = max(1, args.steps - 1) if args.steps > 1 else 1

    # ---- optimizer-state bytes per rank --------------------------------------------------------------------
    breakdown = {}
    n_buckets = buffers = None
    if isinstance(opt, ShardedAdamW):
        breakdown["zeroadamw_state_bytes"] = opt.state_bytes()
        n_buckets = len(opt.engine.buckets)
        pool = opt.engine.pool  # every buffer the optimizer holds besides its state, by kind (bytes, count)
        buffers = {k: {"bytes": sum(t.numel() * t.element_size() for t in pool.held(k)),
                       "count": len(pool.held(k)), "peak_in_use": pool.peak_in_use.get(k, 0)}
                   for k in ("full", "scratch", "shard")}
        buffers["param_flat_padding_bytes"] = sum(b.layout.padding * b.flat.element_size()
                                                  for b in opt.engine.buckets if b.flat is not None)
        buffers["bucket_size"] = opt.bucket_size
    elif mode == "zero_redundancy":
        breakdown["local_adamw_state"] = _tensor_bytes(_state_tensors(opt.optim.state))
    elif mode.startswith("ds_"):
        client_state = _tensor_bytes(_state_tensors(client.state))
        fp32_parts = _tensor_bytes(getattr(opt, "single_partition_of_fp32_groups", []))
        model_ptrs = {p.untyped_storage().data_ptr() for p in model.parameters()}
        shared = [t for t in getattr(opt, "single_partition_of_fp32_groups", [])
                  if t.untyped_storage().data_ptr() in model_ptrs]
        breakdown["client_adamw_state"] = client_state
        breakdown["fp32_master_partitions"] = fp32_parts if not shared else 0
        if shared:
            notes.append("DeepSpeed's fp32 partitions share storage with the model params: not counted")
    elif mode == "bnb_adamw8bit":
        breakdown["bnb_state_incl_quant_tables"] = _tensor_bytes(_state_tensors(opt.state))
        notes.append("uint8 moment elements: " + str(sum(
            t.numel() for st in opt.state.values() for k, t in st.items()
            if k in ("state1", "state2") and torch.is_tensor(t) and t.dtype == torch.uint8)))
    elif mode == "torchao_adamw8bit":  # its state tensors are subclasses holding codes + scales
        inner = [getattr(t, a) for t in _state_tensors(opt.state) for a in ("codes", "scale", "qmap") if hasattr(t, a)]
        plain = [t for t in _state_tensors(opt.state) if not hasattr(t, "codes")]
        breakdown["torchao_state_codes_scales_qmaps"] = _tensor_bytes(inner) + _tensor_bytes(plain)
    elif mode == "lomo":
        breakdown["none (SGD)"] = 0
    else:
        breakdown["adamw_state"] = _tensor_bytes(_state_tensors(opt.state))
    state_bytes = sum(breakdown.values())

    # ---- collective bytes per step ---------------------------------------------------------------------------
    grad_bytes = n_params * elem
    comm, method, detail = 0.0, "none (one process)", {}
    if isinstance(opt, ShardedAdamW) and world > 1:
        c = opt.comm_counters()
        detail = {k: v["bytes"] / counted_steps for k, v in c.items()}
        comm, method = sum(detail.values()), "counted (ShardedAdamW.comm_counters)"
    elif mode in ("ddp_adamw", "bnb_adamw8bit", "torchao_adamw8bit") and world > 1:
        comm, method = ddp_count[0] / counted_steps, "counted (DDP comm hook)"
        detail = {"ddp_all_reduce": comm}
    elif mode == "zero_redundancy" and world > 1:
        bcast = _ring("all_gather", n_params * elem, world)
        detail = {"ddp_all_reduce (counted)": ddp_count[0] / counted_steps, "param_broadcast (computed)": bcast}
        comm, method = sum(detail.values()), "counted (DDP hook) + computed (ZeRO-R broadcasts ~ all-gather)"
    elif mode.startswith("ds_") and world > 1:
        zc = engine.zero_optimization()
        multi = bool(engine.zero_multi_rank_bucket_allreduce())
        rs = bool(engine.zero_reduce_scatter())
        if rs and multi:  # stage_1_and_2.average_tensor -> allreduce_and_scatter: bucketed all-reduce
            detail["grad_all_reduce (bucketed, use_multi_rank_bucket_allreduce)"] = _ring("all_reduce", grad_bytes, world)
        elif rs:  # dist.reduce of each partition to its owner
            detail["grad_reduce_to_owner"] = _ring("reduce", grad_bytes, world)
        else:
            detail["grad_all_reduce"] = _ring("all_reduce", grad_bytes, world)
        detail["param_all_gather"] = _ring("all_gather", n_params * elem, world)
        comm, method = sum(detail.values()), "computed (DeepSpeed's algorithm; see ds_comms_logged)"
        notes.append(f"zero_optimization={bool(zc)} reduce_scatter={rs} use_multi_rank_bucket_allreduce={multi}")

    ds_logged = None
    if mode.startswith("ds_") and world > 1 and not args.no_ds_comms_log:
        # one extra, untimed step with DeepSpeed's comms logger on: the ops DeepSpeed issued and their sizes
        from deepspeed.comm.comm import comms_logger

        comms_logger.comms_dict.clear()
        comms_logger.enabled, comms_logger.prof_all = True, True
        one_step(args.steps)
        comms_logger.enabled = False
        ops, alg = {}, 0.0
        for name, sizes in comms_logger.comms_dict.items():
            calls = sum(v[0] for v in sizes.values())
            nbytes = sum(size * v[0] for size, v in sizes.items())
            ops[name] = {"calls": calls, "msg_bytes": nbytes}
            base = name.split("|")[0]
            if base in ("all_reduce", "all_reduce_coalesced", "inference_all_reduce"):
                alg += _ring("all_reduce", nbytes, world)
            elif base in ("all_gather", "all_gather_into_tensor", "allgather_fn"):
                alg += (world - 1) * nbytes  # the logged size is the input shard: (N-1)/N x (N x shard)
            elif base in ("reduce_scatter", "reduce_scatter_tensor", "reduce_scatter_fn"):
                alg += _ring("reduce_scatter", nbytes, world)
            elif base in ("reduce", "broadcast"):
                alg += _ring(base, nbytes, world)
        ds_logged = {"ops": ops, "algorithmic_bytes": alg}

    rec = {
        "mode": mode, "label": LABELS[mode], "world_size": world, "rank": rank, "status": "ok",
        "device": device.type, "backend": backend if world > 1 or mode.startswith(("ds_", "zero_red")) else None,
        "dtype": args.dtype, "params": n_params, "grad_bytes": grad_bytes,
        "adamw_state_bytes": n_params * 8,  # torch AdamW, fp32 moments
        "state_bytes": state_bytes, "state_breakdown": breakdown, "n_buckets": n_buckets, "buffers": buffers,
        "baseline_bytes": baseline, "construction_growth_bytes": built, "lazy_import_bytes": lazy_import_bytes, "peak_bytes": peak, "peak_growth_bytes": peak - baseline,
        "steady_peak_growth_bytes": (last_peak - baseline) if args.steps > 1 else None,
        "step_ms_median": statistics.median(times[1:] if len(times) > 1 else times) * 1e3,
        "step_ms_all": [t * 1e3 for t in times],
        "comm_bytes_per_step": comm, "comm_method": method, "comm_detail": detail, "ds_comms_logged": ds_logged,
        "final_loss": losses[-1], "losses": losses, "threads": torch.get_num_threads(),
        "malloc_mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_"), "notes": notes,
    }
    with open(os.path.join(args.result_dir, f"{mode}-{world}-{rank}.json"), "w") as f:
        json.dump(rec, f)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


# ------------------------------------------------------------------------------------------------- driver
def model_flags(args) -> list[str]:
    out = []
    for k in ("hidden", "layers", "intermediate", "heads", "kv_heads", "vocab", "seq", "batch", "steps",
              "bucket_size"):
        out += [f"--{k.replace('_', '-')}", str(getattr(args, k))]
    out += ["--dtype", args.dtype, "--device", args.device]
    if args.grad_ckpt:
        out.append("--grad-ckpt")
    if args.no_ds_comms_log:
        out.append("--no-ds-comms-log")
    return out


def launch(mode: str, world: int, args, result_dir: str) -> dict | None:
    """Run one (mode, N); None on success, else a record saying why it could not run."""
    skip = {"mode": mode, "label": LABELS[mode], "world_size": world, "rank": None}
    if mode == "lomo" and world > 1:
        return {**skip, "status": "not applicable",
                "reason": "lomo_optim.Lomo updates in its own backward hooks and never reduces gradients across "
                          "ranks; run under N > 1 processes the replicas would diverge"}
    need = NEEDS.get(mode)
    if need and importlib.util.find_spec(need) is None:
        return {**skip, "status": "not runnable here", "reason": f"{need} is not installed"}
    if mode == "bnb_adamw8bit" and args.device == "cpu":
        pass  # bitsandbytes >= 0.45 has CPU kernels for the 8-bit optimizers; if it fails, the error is recorded
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
           os.path.abspath(__file__), "--worker", "--mode", mode, "--result-dir", result_dir] + model_flags(args)
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // world)),
               TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore")
    if args.device == "cpu" and not args.glibc_default:
        # glibc raises its mmap threshold after large frees and then keeps freed heap memory: VmHWM would then
        # measure the allocator's retention policy (penalising whoever frees and reallocates most) instead of
        # what each optimizer holds. A fixed threshold returns large blocks to the OS at free().
        env["MALLOC_MMAP_THRESHOLD_"] = "131072"
    try:
        p = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {**skip, "status": "failed", "reason": f"timed out after {args.timeout}s"}
    if p.returncode != 0:
        tail = p.stdout.decode(errors="replace").strip().splitlines()
        errs = sorted(f for f in os.listdir(result_dir) if f.startswith(f"{mode}-{world}-") and f.endswith(".err"))
        reason, trace = f"exit code {p.returncode}", "\n".join(tail[-60:])
        if errs:
            with open(os.path.join(result_dir, errs[0])) as f:
                trace = f.read()
            reason = f"rank {errs[0].rsplit('-', 1)[1][:-4]}: {trace.splitlines()[0]}"
        for name in os.listdir(result_dir):  # a partial run leaves no rows behind
            if name.startswith(f"{mode}-{world}-"):
                os.remove(os.path.join(result_dir, name))
        # bitsandbytes: a failure is its CPU support (or its install) -- the row says "not runnable here"
        return {**skip, "status": "not runnable here" if mode == "bnb_adamw8bit" else "failed",
                "reason": reason[:500], "log_tail": trace[-4000:]}
    return None


def _group(records):
    by = {}
    for r in records:
        by.setdefault((r["mode"], r["world_size"]), []).append(r)
    return by


def _get(by, mode, n, key, agg=max):
    rs = [r for r in by.get((mode, n), []) if r.get("status") == "ok"]
    vals = [r[key] for r in rs if r.get(key) is not None]
    return agg(vals) if vals else None


def table(records) -> str:
    mib = 2**20
    by = _group(records)
    lines = ["| mode | N | optimizer state MiB/rank | state / AdamW's | peak growth MiB/rank | steady-state peak "
             "growth MiB/rank | step ms (median) | collective MB/step/rank | how counted | final loss (mean of ranks) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for (mode, n), rs in sorted(by.items(), key=lambda kv: (kv[0][1], MODES.index(kv[0][0]))):
        if rs[0].get("status") != "ok":
            lines.append(f"| {LABELS[mode]} | {n} | {rs[0]['status']}: {rs[0]['reason']} | | | | | | | |")
            continue
        st = max(r["state_bytes"] for r in rs)
        steady = _get(by, mode, n, "steady_peak_growth_bytes")
        method = rs[0]["comm_method"].split(" ")[0]
        lines.append(
            f"| {LABELS[mode]} | {n} | {st / mib:.2f} | {st / rs[0]['adamw_state_bytes']:.3f} | "
            f"{_get(by, mode, n, 'peak_growth_bytes') / mib:.1f} | "
            f"{'-' if steady is None else f'{steady / mib:.1f}'} | {_get(by, mode, n, 'step_ms_median'):.0f} | "
            f"{max(r['comm_bytes_per_step'] for r in rs) / 1e6:.1f} | {method} | "
            f"{statistics.mean(r['final_loss'] for r in rs):.4f} |")
    return "\n".join(lines)


def precision_targets(by, sizes, adamw_state, verdict, out) -> None:
    """Precision-aware state (issue: int8 / bf16 moments, Kahan): state bytes per trainable param per rank x N,
    step time vs fp32-state stage 2 (target <= 1.15x), peak vs the 8-bit optimizers users would pick."""
    mib = 2**20
    n_params = adamw_state / 8
    out.append("**Precision-aware state vs zeroadamw stage 2 with fp32 state** (state bytes per param x N: what one "
               "rank holds per parameter of its 1/N; step time: median step, slowest rank):")
    for n in sizes:
        t2 = _get(by, "zeroadamw_stage2", n, "step_ms_median")
        for mode in PRECISION:
            st, t = _get(by, mode, n, "state_bytes"), _get(by, mode, n, "step_ms_median")
            if st is None or t is None or not t2:
                continue
            verdict(f"time_{mode}_N{n}", t <= 1.15 * t2,
                    f"N={n} {LABELS[mode]}: {st * n / n_params:.2f} B/param x N, step {t:.0f} ms vs {t2:.0f} ms: "
                    f"{t / t2:.2f}x (target <= 1.15x)")
    n = 2 if 2 in sizes else sizes[-1]
    for mode in ("bnb_adamw8bit", "torchao_adamw8bit", "ds_zero2", "zeroadamw_stage2"):
        p = _get(by, mode, n, "peak_growth_bytes")
        for ours in ("zeroadamw_stage2_int8", "zeroadamw_stage2_kahan_int8"):
            q = _get(by, ours, n, "peak_growth_bytes")
            if p is not None and q is not None:
                out.append(f"- N={n} peak growth {LABELS[ours]} {q / mib:.1f} MiB vs {LABELS[mode]} {p / mib:.1f} MiB "
                           f"({q / p:.2f}x)")
        if p is None:
            out.append(f"- N={n} {LABELS[mode]}: not measured ({_status(by, mode, n)})")


def targets(records, kernel_json: str | None) -> tuple[str, list[dict]]:
    """The issue's targets as ratios measured in this run; every line says PASS or MISS with the number."""
    mib = 2**20
    by = _group(records)
    out, verdicts = [], []

    def verdict(name, ok, text):
        verdicts.append({"target": name, "pass": ok, "text": text})
        out.append(f"- **{'PASS' if ok else 'MISS'}** {text}")

    sizes = sorted({r["world_size"] for r in records})
    ok_recs = [r for r in records if r.get("status") == "ok"]
    if not ok_recs:
        return "- no measurement", verdicts
    adamw_state = ok_recs[0]["adamw_state_bytes"]
    out.append("**Optimizer-state bytes per rank = AdamW's / N (+ < N padding elements per bucket):**")
    for n in sizes:
        if n == 1:
            continue
        ref = _get(by, "ddp_adamw", n, "state_bytes") or adamw_state
        for mode in ZERO_MODES:
            st, nb = _get(by, mode, n, "state_bytes"), _get(by, mode, n, "n_buckets")
            if st is None:
                continue
            excess = (st - ref / n) / 8  # elements (8 bytes of moments each)
            ok = 0 <= excess < n * nb
            verdict(f"state_{mode}_N{n}", ok,
                    f"N={n} {LABELS[mode]}: {st / mib:.3f} MiB = {st / ref:.5f} x AdamW's {ref / mib:.3f} MiB "
                    f"(target 1/{n} = {1 / n:.5f}); excess over exactly 1/{n}: {excess:.1f} elements "
                    f"(bound: < N x buckets = {n * nb})")
    out.append("")
    n = 2
    pd, p2, pds = (_get(by, "ddp_adamw", n, "peak_growth_bytes"), _get(by, "zeroadamw_stage2", n, "peak_growth_bytes"),
                   _get(by, "ds_zero2", n, "peak_growth_bytes"))
    out.append(f"**Peak memory per rank at N = {n}, zeroadamw stage 2** (peak RSS growth over the built model, "
               "max over ranks, whole run):")
    if pd is not None and p2 is not None:
        s_ddp = _get(by, "ddp_adamw", n, "state_bytes")
        s_2 = _get(by, "zeroadamw_stage2", n, "state_bytes")
        g = ok_recs[0]["grad_bytes"]
        # theory: gradients (1 - 1/N) of them no longer held + the state no longer held (DDP's bucket copy excluded)
        theory = g * (1 - 1 / n) + (s_ddp - s_2)
        saved = pd - p2
        verdict("peak_vs_ddp", saved >= 0.9 * theory,
                f"stage 2 {p2 / mib:.1f} MiB vs DDP + AdamW {pd / mib:.1f} MiB: saved {saved / mib:.1f} MiB = "
                f"{saved / theory:.0%} of the theoretical {theory / mib:.1f} MiB (gradients x (1 - 1/N) + the "
                f"optimizer state not held; target >= 90%)")
    else:
        out.append("- not measured (ddp_adamw or zeroadamw_stage2 at N = 2 missing)")
    if pds is not None and p2 is not None:
        verdict("peak_vs_ds_zero2", p2 <= pds,
                f"stage 2 {p2 / mib:.1f} MiB vs DeepSpeed ZeRO-2 {pds / mib:.1f} MiB: {p2 / pds:.2f}x (target <= 1.0)")
    else:
        out.append("- vs DeepSpeed ZeRO-2: not measured (" + _status(by, "ds_zero2", n) + ")")
    out.append("")
    out.append("**Step time, zeroadamw stage 2 vs DDP + torch fused AdamW** (median step, slowest rank; one process: "
               "vs torch fused AdamW alone):")
    for m in sizes:
        td_m, t2_m = _get(by, "ddp_adamw", m, "step_ms_median"), _get(by, "zeroadamw_stage2", m, "step_ms_median")
        if td_m and t2_m:
            verdict(f"time_vs_ddp_N{m}", t2_m <= td_m,
                    f"N={m} stage 2 {t2_m:.0f} ms vs DDP + AdamW {td_m:.0f} ms: {t2_m / td_m:.2f}x (target <= 1.00x)")
        to_m = _get(by, "zeroadamw_stage2_overlap", m, "step_ms_median")
        if td_m and to_m and m > 1:
            out.append(f"- N={m} stage 2 + overlap_param_gather {to_m:.0f} ms: {to_m / td_m:.2f}x DDP + AdamW's "
                       "(informational)")
    td, t2, tds = (_get(by, "ddp_adamw", n, "step_ms_median"), _get(by, "zeroadamw_stage2", n, "step_ms_median"),
                   _get(by, "ds_zero2", n, "step_ms_median"))
    if tds and t2:
        verdict("time_vs_ds_zero2", t2 <= tds,
                f"stage 2 {t2:.0f} ms vs DeepSpeed ZeRO-2 {tds:.0f} ms: {t2 / tds:.2f}x (target <= 1.0x)")
    else:
        out.append("- vs DeepSpeed ZeRO-2: not measured (" + _status(by, "ds_zero2", n) + ")")
    tsib = _get(by, "zeroadamw_sib", n, "step_ms_median")
    if tsib and t2:
        verdict("sib_vs_stage2", tsib <= 1.05 * t2,
                f"fused step in backward {tsib:.0f} ms vs stage 2 {t2:.0f} ms: {tsib / t2:.2f}x (target <= 1.05x)")
    else:
        out.append("- fused step in backward vs stage 2: not measured")
    out.append("")
    precision_targets(by, sizes, adamw_state, verdict, out)
    out.append("")
    out.append("**Update kernel vs torch fused AdamW** (`benchmarks/kernel_bandwidth.py`, a separate run):")
    if kernel_json and os.path.exists(kernel_json):
        with open(kernel_json) as f:
            k = json.load(f)
        for t in k.get("targets", []):
            verdict(t["target"], t["pass"], t["text"] + f" [{os.path.relpath(kernel_json)}, {k.get('when', '?')}]")
    else:
        out.append(f"- not measured here ({kernel_json} missing; run benchmarks/kernel_bandwidth.py)")
    out.append("")
    out.append("Same ratios for the other zeroadamw modes and the other systems (informational, no target):")
    for n in sizes:
        if n == 1:
            continue
        pd, td = _get(by, "ddp_adamw", n, "peak_growth_bytes"), _get(by, "ddp_adamw", n, "step_ms_median")
        for mode in MODES:
            if mode == "ddp_adamw":
                continue
            p, t = _get(by, mode, n, "peak_growth_bytes"), _get(by, mode, n, "step_ms_median")
            if p is None or not pd or not td:
                continue
            out.append(f"- N={n} {LABELS[mode]}: peak growth {p / mib:.1f} MiB ({(pd - p) / mib:+.1f} MiB saved vs "
                       f"DDP + AdamW), step time {t / td:.2f}x DDP + AdamW's")
    return "\n".join(out), verdicts


def _status(by, mode, n):
    rs = by.get((mode, n))
    if not rs:
        return "not run"
    return rs[0]["status"] + (": " + rs[0].get("reason", "") if rs[0].get("reason") else "")


def plots(records, prefix: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by = _group(records)
    sizes = sorted({r["world_size"] for r in records})
    written = []
    for key, ylabel, name, scale in (("peak_growth_bytes", "peak memory growth per rank (MiB)", "memory", 2**20),
                                     ("step_ms_median", "median step time (ms, slowest rank)", "step_time", 1)):
        fig, ax = plt.subplots(figsize=(8, 5))
        for i, mode in enumerate(MODES):
            xs = [n for n in sizes if _get(by, mode, n, key) is not None]
            if not xs:
                continue
            ys = [_get(by, mode, n, key) / scale for n in xs]
            style = "-" if mode.startswith("zeroadamw") else "--"
            ax.plot(xs, ys, style, marker="o", label=LABELS[mode], color=f"C{i}")
        ax.set_xlabel("N (ranks)")
        ax.set_xticks(sizes)
        ax.set_ylabel(ylabel)
        r0 = next(r for r in records if r.get("status") == "ok")
        ax.set_title(f"Llama {r0['params'] / 1e6:.1f}M {r0['dtype']}, {r0['device']}; per rank")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = f"{prefix}_{name}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def machine(device: str) -> str:
    import torch

    s = f"{platform.machine()}, {os.cpu_count()} CPU cores, {platform.python_version()}, torch {torch.__version__}"
    try:
        with open("/proc/cpuinfo") as f:
            model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), None)
        if model:
            s += f", {model}"
    except OSError:
        pass
    if device == "cuda":
        s += f", {torch.cuda.get_device_name(0)} x {torch.cuda.device_count()}"
    for lib in ("deepspeed", "bitsandbytes", "transformers", "lomo_optim"):
        try:
            from importlib.metadata import version

            s += f", {lib} {version(lib.replace('_', '-'))}"
        except Exception:  # noqa: BLE001
            s += f", {lib} not installed"
    return s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--mode", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--result-dir", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--smoke", action="store_true", help="CI: 1 step, a tiny Llama, N = 1 and 2, outputs under out/")
    ap.add_argument("--modes", nargs="+", default=MODES, choices=MODES)
    ap.add_argument("--world-sizes", nargs="+", type=int, default=None)
    for k in ("hidden", "layers", "intermediate", "heads", "kv_heads", "vocab", "seq", "batch", "steps"):
        ap.add_argument(f"--{k.replace('_', '-')}", type=int, default=None,
                        help=f"default {DEFAULTS[k]} ({SMOKE[k]} with --smoke)")
    ap.add_argument("--bucket-size", type=int, default=0, help="zeroadamw bucket size (elements); 0 = its default")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                    help="auto: cuda (NCCL) when available, else cpu (gloo)")
    ap.add_argument("--grad-ckpt", action="store_true", help="activation checkpointing (HF, use_reentrant=False)")
    ap.add_argument("--no-ds-comms-log", action="store_true", help="skip DeepSpeed's logged cross-check step")
    ap.add_argument("--glibc-default", action="store_true",
                    help="keep glibc's dynamic mmap threshold (by default CPU workers get MALLOC_MMAP_THRESHOLD_=131072)")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per (mode, N) run")
    ap.add_argument("--out-jsonl", default=None, help="default benchmarks/results/compare.jsonl")
    ap.add_argument("--out-md", default=None, help="default docs/compare.md")
    ap.add_argument("--plots", default=None, help="PNG prefix; default docs/compare (-> docs/compare_memory.png ...)")
    ap.add_argument("--kernel-json", default="benchmarks/results/kernel_bandwidth.json",
                    help="kernel_bandwidth.py's result, quoted in the targets when present")
    args = ap.parse_args()
    if args.worker:
        try:
            worker(args)
        except BaseException as e:  # the driver reports the exception as the row's reason
            import traceback

            with open(os.path.join(args.result_dir, f"{args.mode}-{os.environ.get('WORLD_SIZE', '1')}-"
                                   f"{os.environ.get('RANK', '0')}.err"), "w") as f:
                f.write(f"{type(e).__name__}: {e}\n\n{traceback.format_exc()}")
            raise
        return
    base = SMOKE if args.smoke else DEFAULTS
    for k, v in base.items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    if args.device == "auto":
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    root = "out/compare_smoke" if args.smoke else None
    args.out_jsonl = args.out_jsonl or (f"{root}/compare.jsonl" if root else "benchmarks/results/compare.jsonl")
    args.out_md = args.out_md or (f"{root}/compare.md" if root else "docs/compare.md")
    args.plots = args.plots or (f"{root}/compare" if root else "docs/compare")

    records = []
    t_all = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.world_sizes:
            for mode in args.modes:
                t0 = time.time()
                bad = launch(mode, n, args, tmp)
                if bad is not None:
                    records.append(bad)
                    print(f"{mode} N={n}: {bad['status']}: {bad['reason']}", flush=True)
                else:
                    print(f"ran {mode} N={n} in {time.time() - t0:.0f}s", flush=True)
        for name in sorted(os.listdir(tmp)):
            with open(os.path.join(tmp, name)) as f:
                records.append(json.load(f))
    wall = time.time() - t_all
    records.sort(key=lambda r: (r["world_size"], MODES.index(r["mode"]), r["rank"] if r["rank"] is not None else -1))
    for path in (args.out_jsonl, args.out_md, args.plots):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(args.out_jsonl, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    ok = [r for r in records if r.get("status") == "ok"]
    if not ok:
        print("no (mode, N) ran; see the reasons above", file=sys.stderr)
        sys.exit(1)
    r0 = ok[0]
    cmd = "python benchmarks/compare.py" + ("" if len(sys.argv) == 1 else " " + shlex.join(sys.argv[1:]))
    head = [
        "# zeroadamw vs DDP, ZeroRedundancyOptimizer, DeepSpeed, bitsandbytes, LOMO: side by side", "",
        f"Command: `{cmd}` ({wall / 60:.1f} min wall).  ",
        f"Machine: {machine(args.device)}.  ",
        f"Model: LlamaForCausalLM, {r0['params'] / 1e6:.1f}M {args.dtype} params (hidden {args.hidden}, "
        f"{args.layers} layers, intermediate {args.intermediate}, vocab {args.vocab}), batch {args.batch} x "
        f"{args.seq} tokens per rank, {args.steps} steps, activation checkpointing "
        f"{'on' if args.grad_ckpt else 'off'}; {r0['device']}"
        f"{', gloo' if r0['device'] == 'cpu' else ', NCCL'}; "
        f"{'MALLOC_MMAP_THRESHOLD_=131072 (see the docstring)' if args.device == 'cpu' and not args.glibc_default else ''}.  ",
        "Every (mode, N) ran in fresh processes (torchrun). Per rank: peak = VmHWM (peak RSS; CUDA allocator "
        "peak on GPU) reset after the model was built, reported as growth over that baseline, max over ranks; "
        "step = median of forward + backward + step over steps 2.., slowest rank. "
        "Collective bytes per step per rank: *counted* = measured in the run (zeroadamw's counters, a DDP comm hook); "
        "*computed* = the algorithmic bytes of the library's algorithm (DeepSpeed: cross-checked against its comms "
        "logger in one extra step, in the JSONL). On gloo zeroadamw's fp32 reduce-scatter runs as an all-reduce and "
        "is counted as one (gloo's own reduce-scatter is slower); on NCCL it is a real reduce-scatter.", "",
    ]
    tgt, verdicts = targets(records, args.kernel_json)
    md = "\n".join(head) + "\n" + table(records) + "\n\n## Targets (measured in this run)\n\n" + tgt + "\n"
    pngs = plots(records, args.plots)
    md += "\n" + "\n".join(f"![{os.path.basename(p)}]({os.path.relpath(p, os.path.dirname(args.out_md) or '.')})"
                           for p in pngs) + "\n"
    with open(args.out_md, "w") as f:
        f.write(md)
    print(md)
    print(f"wrote {args.out_jsonl}, {args.out_md}, {', '.join(pngs)}")


if __name__ == "__main__":
    main()
