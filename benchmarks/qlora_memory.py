"""Peak memory per rank of QLoRA vs LoRA vs full fine-tuning of one LLaMA, with ShardedAdamW in each state mode.

    python benchmarks/qlora_memory.py [--steps 6] [--hidden 768 --layers 6 --intermediate 2048]
                                      [--out benchmarks/results/qlora_memory] [--doc docs/qlora_memory.md]

One run measures every configuration, in the same conditions (paired): the driver builds one LLaMA (seed 0, from
a LlamaConfig -- nothing downloaded) and saves it; then each configuration runs in fresh processes
(``torchrun --nproc_per_node 2``; gloo on CPU) that load that same checkpoint --

* ``full``: every weight trainable (fp32 weights; or bf16 weights, with an fp32 master or Kahan summation);
* ``lora``: the fp32 base frozen, LoRA adapters on q/k/v/o (r 16, PEFT) trainable;
* ``qlora``: the base loaded 4-bit NF4 (bitsandbytes ``Linear4bit``, bf16 compute), the same adapters trainable

-- and train ``--steps`` steps of ShardedAdamW stage 2 (``state_dtype`` fp32 / bf16 / int8; ``kahan_sum`` on bf16
weights or adapters) on their own batches of the standard library's docstrings (byte-level). Per rank:

* ``rss_imports``: resident memory after the imports, before the model (Python, torch, transformers, peft, bnb);
* ``rss_model``: after the model (and adapters) are built and copied out of the checkpoint's memory map -- the
  weights (4-bit ones with their quantization state);
* ``peak``: VmHWM during training, reset (``/proc/self/clear_refs``) once the model is built (so loading's
  transient is left out);
* ``state_bytes``: ``opt.state_bytes()`` (every byte: moments, int8 codes and scales, masters, compensations),
  by storage kind (int8 leaves params of < 4096 elements -- here the k/v ``lora_B``, 128 x 16 -- fp32).

The table's "model + training" is ``peak - rss_imports``: what the model and its fine-tuning cost the process.
Workers run with ``MALLOC_MMAP_THRESHOLD_=131072`` (as benchmarks/memory.py: otherwise glibc keeps freed large
blocks and VmHWM measures allocator retention) and one thread each. Output: ``<out>.jsonl`` (one record per rank
and configuration) and the markdown table in ``--doc``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORLD = 2

# name -> (method, weight/adapter dtype, ShardedAdamW keywords)
CONFIGS = {
    "full/fp32": ("full", "float32", {}),
    "full/bf16-state": ("full", "float32", {"state_dtype": "bf16"}),
    "full/int8-state": ("full", "float32", {"state_dtype": "int8"}),
    "full/bf16-weights+master": ("full", "bfloat16", {}),
    "full/bf16-weights+kahan": ("full", "bfloat16", {"kahan_sum": True, "master_dtype": None}),
    "lora/fp32": ("lora", "float32", {}),
    "lora/bf16-state": ("lora", "float32", {"state_dtype": "bf16"}),
    "lora/int8-state": ("lora", "float32", {"state_dtype": "int8"}),
    "lora/bf16-adapters+kahan": ("lora", "bfloat16", {"kahan_sum": True, "master_dtype": None}),
    "qlora/fp32": ("qlora", "float32", {}),
    "qlora/bf16-state": ("qlora", "float32", {"state_dtype": "bf16"}),
    "qlora/int8-state": ("qlora", "float32", {"state_dtype": "int8"}),
    "qlora/bf16-adapters+kahan": ("qlora", "bfloat16", {"kahan_sum": True, "master_dtype": None}),
}
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def llama_config(args):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=256, hidden_size=args.hidden, intermediate_size=args.intermediate,
                       num_hidden_layers=args.layers, num_attention_heads=args.heads,
                       num_key_value_heads=args.kv_heads, max_position_embeddings=max(512, args.seq_len),
                       tie_word_embeddings=False)


def param_bytes(model) -> int:
    """Bytes of the model's parameters; bitsandbytes 4-bit ones (packed uint8) with their quantization state."""
    import torch

    n = 0
    for p in model.parameters():
        n += p.numel() * p.element_size()
        qs = getattr(p, "quant_state", None)
        if qs is not None:
            for t in (getattr(qs, "absmax", None), getattr(qs, "code", None)):
                if torch.is_tensor(t):
                    n += t.numel() * t.element_size()
    return n


def state_by_storage(opt) -> dict[str, dict[str, int]]:
    import torch

    short = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
    out: dict[str, dict[str, int]] = {}
    for b in opt.engine.buckets:
        kind = b.moments if isinstance(b.moments, str) else short.get(b.moments, str(b.moments))
        kind += "+kahan" if b.kahan_comp is not None else "+master" if b.master is not None else ""
        d = out.setdefault(kind, {"numel": 0, "bytes": 0})
        d["numel"] += sum(p.numel() for p in b.params)
        d["bytes"] += b.state_bytes()
    return out


def materialize(model) -> None:
    """Copy every parameter and buffer that is not 4-bit into anonymous memory. ``from_pretrained`` leaves tensors
    as views of the checkpoint's memory map: fp32 weights resident only once touched (the first forward would
    count them as training memory), and after a 4-bit load the whole file's pages stay resident (RssFile, here
    about 150 MiB) for as long as one small view (a norm weight) holds the map. Then rss_model is what the weights
    take, for every configuration."""
    import gc

    for mod in model.modules():
        for name, p in list(mod.named_parameters(recurse=False)):
            if type(p).__name__ != "Params4bit":
                p.data = p.data.clone()
        for name, b in list(mod.named_buffers(recurse=False)):
            if b is not None:
                setattr(mod, name, b.clone())
    gc.collect()


def worker(args) -> None:
    import torch
    import torch.distributed as dist

    sys.path.insert(0, os.path.join(ROOT, "src"))
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from zeroadamw import ShardedAdamW
    from zeroadamw.memory import current_rss_bytes, peak_memory_bytes, reset_peak_memory

    import bitsandbytes as bnb  # every configuration imports the same modules before rss_imports
    from peft import prepare_model_for_kbit_training

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    method, dtype_name, okw = CONFIGS[args.config]
    dtype = getattr(torch, dtype_name)
    with open(args.corpus, "rb") as f:
        ids = torch.frombuffer(bytearray(f.read()), dtype=torch.uint8).long()
    dist.barrier()
    rss_imports = current_rss_bytes()

    if method == "qlora":
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
        model = AutoModelForCausalLM.from_pretrained(args.model_dir, quantization_config=quant, device_map="cpu")
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        for m in model.modules():  # as launch/finetune_llama.py: no in-place CPU repack of the 4-bit weights
            if isinstance(m, bnb.nn.Linear4bit):
                m.support_avx512bf16_for_cpu = False
    else:
        base_dtype = dtype if method == "full" else torch.float32
        model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=base_dtype)
    if method in ("lora", "qlora"):
        torch.manual_seed(0)
        model = get_peft_model(model, LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.0,
                                                 target_modules=LORA_TARGETS, task_type="CAUSAL_LM"))
        for p in model.parameters():
            if p.requires_grad and p.dtype != dtype:
                p.data = p.data.to(dtype)
    materialize(model)
    model.train()
    linear4bit = sum(type(m).__name__ == "Linear4bit" for m in model.modules())
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [{"params": [p for n, p in trainable if p.ndim >= 2 and "norm" not in n], "weight_decay": 0.01},
              {"params": [p for n, p in trainable if not (p.ndim >= 2 and "norm" not in n)], "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    dist.barrier()
    rss_model = current_rss_bytes()
    reset_peak_memory()
    opt = ShardedAdamW(groups, lr=args.lr, stage=2, max_grad_norm=1.0, **okw)
    times, losses = [], []
    B, T = args.batch, args.seq_len
    for step in range(args.steps):
        g = torch.Generator().manual_seed(1000 * step + rank)
        starts = torch.randint(0, len(ids) - T, (B,), generator=g)
        x = torch.stack([ids[s : s + T] for s in starts.tolist()])
        t0 = time.perf_counter()
        loss = model(input_ids=x, labels=x).loss  # (the model shifts the labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
    peak = peak_memory_bytes()
    rec = {
        "config": args.config, "method": method, "trainable_dtype": dtype_name,
        "optimizer_kwargs": dict(okw),
        "world_size": dist.get_world_size(), "rank": rank,
        "params": sum(p.numel() for p in model.parameters()), "trainable_params": sum(p.numel() for _, p in trainable),
        "param_bytes": param_bytes(model), "linear4bit_layers": linear4bit,
        "rss_imports": rss_imports, "rss_model": rss_model, "peak": peak,
        "model_rss": rss_model - rss_imports, "training_peak_growth": peak - rss_model,
        "peak_above_imports": peak - rss_imports,
        "state_bytes": opt.state_bytes(), "state_by_storage": state_by_storage(opt),
        "peak_grad_bytes": opt.engine.peak_grad_bytes,
        "step_s_median": statistics.median(times[1:] if len(times) > 1 else times),
        "loss_first": losses[0], "loss_last": losses[-1],
    }
    with open(os.path.join(args.result_dir, f"{args.config.replace('/', '_')}-{rank}.json"), "w") as f:
        json.dump(rec, f)
    dist.barrier()
    dist.destroy_process_group()


def launch(config: str, args, model_dir: str, corpus: str, result_dir: str) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}",
           os.path.abspath(__file__), "--worker", "--config", config, "--model-dir", model_dir, "--corpus", corpus,
           "--result-dir", result_dir, "--steps", str(args.steps), "--seq-len", str(args.seq_len),
           "--batch", str(args.batch), "--lora-r", str(args.lora_r), "--lr", str(args.lr)]
    env = dict(os.environ, OMP_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_="131072")
    out = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{config} failed:\n{out.stdout[-4000:]}")


def table(records: list[dict]) -> str:
    mib = 2**20
    by: dict[str, list[dict]] = {}
    for r in records:
        by.setdefault(r["config"], []).append(r)
    lines = ["| configuration | trainable | weights MiB | state MiB/rank | state by storage (rank 0) | "
             "training peak growth MiB | model + training MiB | s/step | loss first → last |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name in CONFIGS:
        rs = by.get(name)
        if not rs:
            continue
        r0 = rs[0]
        storage = ", ".join(f"{k} {d['numel'] / 1e6:.3g}M el. {d['bytes'] / mib:.2f} MiB"
                            for k, d in r0["state_by_storage"].items())
        lines.append(
            f"| {name} | {r0['trainable_params'] / 1e6:.2f}M {r0['trainable_dtype'].replace('float', 'fp').replace('bfp', 'bf')} | "
            f"{r0['param_bytes'] / mib:.1f} | {max(r['state_bytes'] for r in rs) / mib:.2f} | {storage} | "
            f"{max(r['training_peak_growth'] for r in rs) / mib:.0f} | {max(r['peak_above_imports'] for r in rs) / mib:.0f} | "
            f"{max(r['step_s_median'] for r in rs):.2f} | {r0['loss_first']:.2f} → {r0['loss_last']:.2f} |")
    return "\n".join(lines)


def summary(records: list[dict]) -> str:
    def get(name, key):
        rs = [r for r in records if r["config"] == name]
        return max(r[key] for r in rs) if rs else None

    mib = 2**20
    out = []
    full, lora, qlora = (get(f"{m}/fp32", "peak_above_imports") for m in ("full", "lora", "qlora"))
    if None not in (full, lora, qlora):
        out.append(f"- model + training per rank, fp32 state: full {full / mib:.0f} MiB, LoRA {lora / mib:.0f} MiB "
                   f"({lora / full:.2f} x full), QLoRA {qlora / mib:.0f} MiB ({qlora / full:.2f} x full, "
                   f"{qlora / lora:.2f} x LoRA)")
    wl, wq = get("lora/fp32", "param_bytes"), get("qlora/fp32", "param_bytes")
    if wl and wq:
        out.append(f"- weights: fp32 base + adapters {wl / mib:.1f} MiB, 4-bit base (NF4 + absmax) + adapters "
                   f"{wq / mib:.1f} MiB ({wq / wl:.2f} x)")
    for m in ("full", "lora", "qlora"):
        ref = get(f"{m}/fp32", "state_bytes")
        if not ref:
            continue
        parts = [f"{k.split('/')[1]} {get(k, 'state_bytes') / ref:.3f}" for k in CONFIGS
                 if k.startswith(m + "/") and k != f"{m}/fp32" and get(k, "state_bytes") is not None]
        out.append(f"- {m}: optimizer state per rank vs fp32 moments: " + ", ".join(parts))
    int8 = [r for r in records if r["config"] in ("lora/int8-state", "qlora/int8-state") and r["rank"] == 0]
    for r in int8:
        fp = r["state_by_storage"].get("fp32", {"numel": 0})["numel"]
        if fp:
            out.append(f"- {r['config']}: {fp:,} of the {r['trainable_params']:,} adapter elements are in params of "
                       f"< 4096 elements (the k/v lora_B) and keep fp32 moments")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--config", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--corpus", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--result-dir", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--intermediate", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--out", default="benchmarks/results/qlora_memory")
    ap.add_argument("--doc", default="docs/qlora_memory.md")
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    import torch
    from transformers import LlamaForCausalLM

    sys.path.insert(0, os.path.join(ROOT, "src"))
    from zeroadamw.demo import stdlib_corpus

    records = []
    t_all = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, corpus, result_dir = (os.path.join(tmp, n) for n in ("model", "corpus.txt", "results"))
        os.makedirs(result_dir)
        torch.manual_seed(0)
        LlamaForCausalLM(llama_config(args)).save_pretrained(model_dir)
        with open(corpus, "wb") as f:
            f.write(stdlib_corpus())
        for config in args.configs:
            t0 = time.time()
            launch(config, args, model_dir, corpus, result_dir)
            print(f"ran {config} in {time.time() - t0:.0f}s", flush=True)
        for name in sorted(os.listdir(result_dir)):
            with open(os.path.join(result_dir, name)) as f:
                records.append(json.load(f))
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out + ".jsonl", "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    import bitsandbytes
    import peft
    import transformers

    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    r0 = records[0]
    cmd = " ".join(["python", "benchmarks/qlora_memory.py", *sys.argv[1:]])
    head = (
        "# QLoRA vs LoRA vs full fine-tuning: peak memory per rank with ShardedAdamW's state modes\n\n"
        f"Measured with `{cmd}` (written by benchmarks/qlora_memory.py; records in `{args.out}.jsonl`) on "
        f"{platform.machine()}, {os.cpu_count()} CPU cores, {mem:.0f} GiB, CPU only, {WORLD} ranks (torchrun, gloo, "
        f"one thread each, MALLOC_MMAP_THRESHOLD_=131072); torch {torch.__version__}, transformers "
        f"{transformers.__version__}, peft {peft.__version__}, bitsandbytes {bitsandbytes.__version__}; "
        f"{time.time() - t_all:.0f} s in all.\n\n"
        f"Model: LLaMA, hidden {args.hidden}, {args.layers} layers, intermediate {args.intermediate}, "
        f"{args.heads} heads / {args.kv_heads} KV heads, byte vocabulary: {r0['params'] / 1e6:.1f}M params "
        "(built from a LlamaConfig, seed 0, saved once and loaded by every configuration). LoRA / QLoRA: r "
        f"{args.lora_r}, alpha {2 * args.lora_r}, on q/k/v/o (PEFT); QLoRA's base 4-bit NF4 (bitsandbytes "
        f"Linear4bit, bf16 compute). ShardedAdamW stage 2, {args.steps} steps of {args.batch} x {args.seq_len} "
        "tokens per rank (Python's docstrings), max_grad_norm 1.\n\n"
        "Columns: *weights* -- every parameter's bytes (4-bit: packed NF4 + absmax); *state* -- "
        "`opt.state_bytes()` of one rank, and by storage (moments kind; `+master` / `+kahan`: with an fp32 master / a "
        "bf16 compensation); *training peak growth* -- VmHWM during training over the resident memory once the model "
        "was built (gradients, optimizer state, activations, buffers); *model + training* -- VmHWM during training "
        "over the resident memory after the imports (the whole cost of the model and its fine-tuning to a rank). "
        "Max over the 2 ranks.\n\n"
    )
    md = head + table(records) + "\n\n" + summary(records) + "\n"
    os.makedirs(os.path.dirname(args.doc) or ".", exist_ok=True)
    with open(args.doc, "w") as f:
        f.write(md)
    print(md)


if __name__ == "__main__":
    main()
