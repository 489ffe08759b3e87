"""Precision-aware state: quality and state bytes, side by side in one run.

    python benchmarks/precision.py                          # 1,000 steps per mode (~30 min on 2 CPU cores)
    python benchmarks/precision.py --steps 60 --out /tmp    # smoke test
    python benchmarks/precision.py --replot                 # redraw docs/precision_quality.png from the JSON
    python benchmarks/precision.py --state-bytes            # state bytes per rank, 49.9M LLaMA, N = 1, 2, 4 (~1 min)

**Quality.** A small LLaMA (``LlamaForCausalLM`` from a config: 3 layers, hidden 96, heads 4, intermediate 256,
byte vocabulary 256; 0.38M params, every matrix >= 4096 elements: int8) learns next-byte prediction on the docstrings of Python's standard library
(``zeroadamw.demo.stdlib_corpus``: nothing downloaded), batch 8 x 128 bytes, lr 2e-3 with 5 % linear warm-up and
cosine decay to 10 %, weight decay 0.1 on matrices, betas (0.9, 0.95), for ``--steps`` steps. Validation loss
(nats/byte) on a disjoint 5 % slice, 16 fixed batches, every 100 steps. The same init and batch order for every
mode. One process: the storage of the state does not depend on the world size (tests/test_precision.py checks
the sharded state equals the one-process state bit for bit).

Modes -- fp32 weights: ``torch.optim.AdamW`` (the reference), zeroadamw fp32 / bf16 / int8 moments,
bitsandbytes ``AdamW8bit``; bf16 weights: zeroadamw with an fp32 master (default), Kahan (``master_dtype=None,
kahan_sum=True``), Kahan + int8 moments, the plain bf16 update (``master_dtype=None``), and optimi's
``AdamW(kahan_sum=True)`` on the same bf16 model.

**State bytes** per rank of each mode for the same model are ``opt.state_bytes()`` (torch / bnb / optimi: the
bytes of their state tensors), per trainable parameter. ``--state-bytes`` measures them on N = 1, 2, 4 real gloo
processes for the 49.9M-param LLaMA of benchmarks/compare.py in bf16 (each rank builds every mode's
ShardedAdamW and its state; nothing is trained): ``docs/precision_state_bytes.md``.

Outputs (``--out``, default ``docs/``): ``precision_quality.json`` (curves, final losses, ratios),
``precision_quality.md`` (the table) and ``precision_quality.png`` (the curves).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "src"))

FP32_MODES = ["torch_adamw", "zeroadamw_fp32", "zeroadamw_bf16_moments", "zeroadamw_int8_moments", "bnb_adamw8bit"]
BF16_MODES = ["zeroadamw_bf16_master", "zeroadamw_kahan", "zeroadamw_kahan_int8", "zeroadamw_bf16_plain",
              "optimi_kahan"]
MODES = FP32_MODES + BF16_MODES
LABELS = {
    "torch_adamw": "torch AdamW (fp32 weights, fp32 moments)",
    "zeroadamw_fp32": "zeroadamw, fp32 moments",
    "zeroadamw_bf16_moments": "zeroadamw, bf16 moments",
    "zeroadamw_int8_moments": "zeroadamw, int8 moments",
    "bnb_adamw8bit": "bitsandbytes AdamW8bit",
    "zeroadamw_bf16_master": "bf16 weights + fp32 master (zeroadamw default)",
    "zeroadamw_kahan": "bf16 weights, Kahan (no master)",
    "zeroadamw_kahan_int8": "bf16 weights, Kahan + int8 moments",
    "zeroadamw_bf16_plain": "bf16 weights, plain bf16 update",
    "optimi_kahan": "optimi AdamW, bf16 weights, Kahan",
}
LR, WD, BETAS, BATCH, SEQ, EVAL_BATCHES = 2e-3, 0.1, (0.9, 0.95), 8, 128, 16


def make_model(dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=96, intermediate_size=256, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=SEQ,
                      tie_word_embeddings=False, attn_implementation="eager")
    return LlamaForCausalLM(cfg).to(dtype)


def param_groups(model):
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    return [{"params": decay, "weight_decay": WD}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(mode: str, model):
    from zeroadamw import ShardedAdamW

    groups = param_groups(model)
    kw = dict(lr=LR, betas=BETAS, eps=1e-8)
    if mode == "torch_adamw":
        return torch.optim.AdamW(groups, **kw)
    if mode == "bnb_adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(groups, **kw)
    if mode == "optimi_kahan":
        import optimi

        return optimi.AdamW(groups, **kw, kahan_sum=True)
    opts = {"zeroadamw_fp32": {}, "zeroadamw_bf16_moments": dict(state_dtype="bf16"),
            "zeroadamw_int8_moments": dict(state_dtype="int8"), "zeroadamw_bf16_master": {},
            "zeroadamw_kahan": dict(master_dtype=None, kahan_sum=True),
            "zeroadamw_kahan_int8": dict(master_dtype=None, kahan_sum=True, state_dtype="int8"),
            "zeroadamw_bf16_plain": dict(master_dtype=None)}[mode]
    return ShardedAdamW(groups, **kw, **opts)


def state_bytes(opt) -> int:
    if hasattr(opt, "state_bytes"):
        return opt.state_bytes()
    seen, total = set(), 0
    for st in opt.state.values():
        for k, t in st.items():
            if torch.is_tensor(t) and k != "step" and t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
    return total


def data():
    from zeroadamw.demo import stdlib_corpus

    ids = torch.frombuffer(bytearray(stdlib_corpus()), dtype=torch.uint8).long()
    cut = int(len(ids) * 0.95)
    return ids[:cut], ids[cut:]


def batches(ids: torch.Tensor, n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        starts = torch.randint(0, len(ids) - SEQ - 1, (BATCH,), generator=g)
        yield torch.stack([ids[s : s + SEQ] for s in starts.tolist()])


def lr_lambda(steps: int):
    warm = max(1, steps // 20)

    def f(s):
        if s < warm:
            return (s + 1) / warm
        t = (s - warm) / max(1, steps - warm)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))

    return f


@torch.no_grad()
def evaluate(model, val) -> float:
    model.eval()
    losses = [model(input_ids=x, labels=x).loss.float().item() for x in batches(val, EVAL_BATCHES, seed=99)]
    model.train()
    return sum(losses) / len(losses)


def run_mode(mode: str, steps: int, train, val) -> dict:
    dtype = torch.bfloat16 if mode in BF16_MODES else torch.float32
    model = make_model(dtype)
    opt = make_optimizer(mode, model)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(steps))
    n_params = sum(p.numel() for p in model.parameters())
    curve, t0, train_losses = [], time.perf_counter(), []
    for s, x in enumerate(batches(train, steps, seed=1)):
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        train_losses.append(loss.float().item())
        if (s + 1) % 100 == 0 or s + 1 == steps:
            curve.append((s + 1, evaluate(model, val)))
            print(f"  {mode:26s} step {s + 1:5d}  val {curve[-1][1]:.4f}", flush=True)
    return {"mode": mode, "label": LABELS[mode], "weights": str(dtype).replace("torch.", ""),
            "val_curve": curve, "final_val": curve[-1][1], "final_train": sum(train_losses[-50:]) / min(50, steps),
            "state_bytes": state_bytes(opt), "params": n_params, "seconds": time.perf_counter() - t0}


def write(out: str, results: list[dict], steps: int) -> None:
    ref = next(r["final_val"] for r in results if r["mode"] == "torch_adamw")
    for r in results:
        r["vs_torch_adamw"] = r["final_val"] / ref
    meta = {"steps": steps, "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}",
            "command": "python benchmarks/precision.py" + (f" --steps {steps}" if steps != 1000 else "")}
    with open(os.path.join(out, "precision_quality.json"), "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=1)
    lines = [f"Command: `{meta['command']}`; machine: {meta['machine']}; {steps} steps, one process.", "",
             "| mode | weights | final val loss | vs torch AdamW | state B/param |",
             "|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['label']} | {r['weights']} | {r['final_val']:.4f} | {r['vs_torch_adamw']:.4f}x | "
                     f"{r['state_bytes'] / r['params']:.2f} |")
    with open(os.path.join(out, "precision_quality.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    plot(out, results)


def plot(out: str, results: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for ax, modes, title in ((axes[0], FP32_MODES, "fp32 weights"), (axes[1], BF16_MODES, "bf16 weights")):
        ref = next(r for r in results if r["mode"] == "torch_adamw")
        ax.plot(*zip(*ref["val_curve"]), color="black", lw=2.5, alpha=0.35, label="torch AdamW fp32 (reference)")
        for r in results:
            if r["mode"] in modes and r["mode"] != "torch_adamw":
                ax.plot(*zip(*r["val_curve"]), label=f"{r['label']} ({r['final_val']:.3f})")
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_ylabel("validation loss (nats/byte)")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "precision_quality.png"), dpi=110)


STATE_MODES = {"fp32 moments + fp32 master": {}, "bf16 moments + fp32 master": dict(state_dtype="bf16"),
               "int8 moments + fp32 master": dict(state_dtype="int8"),
               "fp32 moments + Kahan": dict(master_dtype=None, kahan_sum=True),
               "bf16 moments + Kahan": dict(master_dtype=None, kahan_sum=True, state_dtype="bf16"),
               "int8 moments + Kahan": dict(master_dtype=None, kahan_sum=True, state_dtype="int8")}


def _state_bytes_rank(rank: int, world: int, store: str, out: str) -> None:
    import torch.distributed as dist
    from transformers import LlamaConfig, LlamaForCausalLM

    from zeroadamw import ShardedAdamW

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=8000, hidden_size=640, intermediate_size=1728, num_hidden_layers=8,
                      num_attention_heads=10, num_key_value_heads=10, max_position_embeddings=128,
                      tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    res = {}
    for name, kw in STATE_MODES.items():
        opt = ShardedAdamW(model.parameters(), lr=1e-3, **kw)
        opt._init_state()
        res[name] = opt.state_bytes()
        del opt
    torch.save({"rank": rank, "bytes": res, "params": sum(p.numel() for p in model.parameters())},
               os.path.join(out, f"r{world}-{rank}.pt"))
    dist.destroy_process_group()


def state_bytes_table(out: str) -> None:
    import tempfile

    import torch.multiprocessing as tmp

    rows = {}
    with tempfile.TemporaryDirectory() as d:
        for world in (1, 2, 4):
            tmp.start_processes(_state_bytes_rank, args=(world, os.path.join(d, f"store{world}"), d),
                                nprocs=world, start_method="spawn")
            got = [torch.load(os.path.join(d, f"r{world}-{r}.pt")) for r in range(world)]
            n = got[0]["params"]
            rows[world] = {k: max(g["bytes"][k] for g in got) for k in STATE_MODES} | {"params": n}
    lines = ["Command: `python benchmarks/precision.py --state-bytes`; 49.9M-param LLaMA (bf16 weights), real gloo "
             "processes, `opt.state_bytes()` of the rank holding most; B/param x N = what one rank holds per "
             "parameter of its 1/N.", "",
             "| state | " + " | ".join(f"N = {w}: MiB/rank | B/param x N" for w in rows) + " |",
             "|---|" + "---|---|" * len(rows)]
    for k in STATE_MODES:
        cells = [f"{rows[w][k] / 2**20:.1f} | {rows[w][k] * w / rows[w]['params']:.3f}" for w in rows]
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    with open(os.path.join(out, "precision_state_bytes.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(out, "precision_state_bytes.json"), "w") as f:
        json.dump({str(w): r for w, r in rows.items()}, f, indent=1)
    print("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--modes", nargs="+", default=MODES, choices=MODES)
    ap.add_argument("--out", default=os.path.join(HERE, "..", "docs"))
    ap.add_argument("--replot", action="store_true")
    ap.add_argument("--state-bytes", action="store_true", help="the state-bytes table at N = 1, 2, 4 only")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    if args.state_bytes:
        return state_bytes_table(args.out)
    if args.replot:
        with open(os.path.join(args.out, "precision_quality.json")) as f:
            return plot(args.out, json.load(f)["results"])
    torch.set_num_threads(max(1, (os.cpu_count() or 2)))
    train, val = data()
    modes = args.modes if "torch_adamw" in args.modes else ["torch_adamw", *args.modes]
    if args.modes == MODES:  # zeroadamw fp32 is torch AdamW bit for bit (tests/test_sharded_single.py): not re-run
        modes = [m for m in modes if m != "zeroadamw_fp32"]
    results = [run_mode(m, args.steps, train, val) for m in modes]
    write(args.out, results, args.steps)


if __name__ == "__main__":
    main()
