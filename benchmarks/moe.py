"""SparseAdamW vs dense AdamW on a tiny Mixtral: step time, optimizer time, and the "ghost updates" of idle experts.

    python benchmarks/moe.py [--steps 60] [--experts 8] [--top-k 2] [--tokens 4] [--out docs/moe]

One process. A MixtralForCausalLM from MixtralConfig (8 experts, top-2 routing, fused expert tensors as in
transformers 5), fp32, trained on random token sequences short enough that some experts get no tokens in a step.
Both optimizers start from the same weights and see the same batches; a forward hook on every router records which
experts were routed tokens the loss depends on. For every (layer, expert) slice idle in a step we add how far the
slice moved in that step (L2 of the change): dense AdamW keeps moving idle experts by their stale momentum and
keeps decaying them; SparseAdamW must not move them at all (catch-up decay is applied when they come back).
Timing: median over steps of fwd+bwd+step and of ``optimizer.step()`` alone (paired, same process).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=4, help="tokens per sequence (few: some experts stay idle)")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--out", default="docs/moe")
    args = ap.parse_args()
    from transformers import MixtralConfig, MixtralForCausalLM

    from zeroadamw import SparseAdamW, moe_param_groups

    torch.manual_seed(0)
    cfg = MixtralConfig(vocab_size=256, hidden_size=args.hidden, intermediate_size=args.hidden * 2,
                        num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=2,
                        num_local_experts=args.experts, num_experts_per_tok=args.top_k, max_position_embeddings=64)
    base = MixtralForCausalLM(cfg)
    models = {"dense AdamW": base, "SparseAdamW": MixtralForCausalLM(cfg)}
    models["SparseAdamW"].load_state_dict(base.state_dict())
    groups, names = moe_param_groups(models["SparseAdamW"], weight_decay=0.1)
    opts = {
        "dense AdamW": torch.optim.AdamW([{"params": [p for n, p in base.named_parameters() if n in names.get(k, [])],
                                           "weight_decay": g["weight_decay"]} for k, g in zip(names, groups)],
                                         lr=3e-3, fused=True),
        "SparseAdamW": SparseAdamW(groups, lr=3e-3),
    }
    expert_names = names["experts_rows"]
    used: dict[str, set] = {}
    for m in models.values():
        for i, layer in enumerate(m.model.layers):
            def hook(mod, inp, out, name=f"model.layers.{i}.mlp.experts"):
                logits = out[0] if isinstance(out, tuple) else out
                picks = logits.reshape(-1, args.tokens, logits.shape[-1]).topk(args.top_k, dim=-1).indices
                used.setdefault(name, set()).update(picks[:, :-1].flatten().tolist())  # last position: no target
            layer.mlp.gate.register_forward_hook(hook)
    drift = {k: 0.0 for k in models}
    drift_curve = {k: [] for k in models}
    idle_slices = 0
    step_t = {k: [] for k in models}
    opt_t = {k: [] for k in models}
    for step in range(args.steps):
        g = torch.Generator().manual_seed(step)
        ids = torch.randint(0, 256, (2, args.tokens), generator=g)
        idle_now = {}
        for key, model in models.items():
            params = dict(model.named_parameters())
            used.clear()
            before = {n: params[n].detach().clone() for n in expert_names}
            t0 = time.perf_counter()
            model(input_ids=ids, labels=ids).loss.backward()
            t1 = time.perf_counter()
            opts[key].step()
            t2 = time.perf_counter()
            opts[key].zero_grad(set_to_none=True)
            step_t[key].append(t2 - t0)
            opt_t[key].append(t2 - t1)
            for n in expert_names:
                layer = n.rsplit(".", 1)[0]
                idle = [e for e in range(args.experts) if e not in used.get(layer, set())]
                idle_now[n] = idle
                for e in idle:
                    drift[key] += (params[n][e] - before[n][e]).norm().item()
            drift_curve[key].append(drift[key])
        idle_slices += sum(len(v) for v in idle_now.values())
    res = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}",
        "params": sum(p.numel() for p in base.parameters()),
        "expert_params": sum(dict(base.named_parameters())[n].numel() for n in expert_names),
        "steps": args.steps, "idle_expert_slices": idle_slices,
        "drift": drift,
        "step_ms_median": {k: statistics.median(v[1:]) * 1e3 for k, v in step_t.items()},
        "optimizer_ms_median": {k: statistics.median(v[1:]) * 1e3 for k, v in opt_t.items()},
    }
    lines = [f"Measured with `python benchmarks/moe.py {' '.join(sys.argv[1:])}` on {res['machine']}: MixtralForCausalLM "
             f"{res['params'] / 1e6:.2f}M params ({res['expert_params'] / 1e6:.2f}M in {args.experts} experts x "
             f"{args.layers} layers, top-{args.top_k}), {args.steps} steps of 2 x {args.tokens} tokens; "
             f"{idle_slices} (layer, expert) slices were idle in some step.", "",
             "| optimizer | median step ms (fwd+bwd+step) | median optimizer.step() ms | total movement of idle experts (sum of L2) |",
             "|---|---|---|---|"]
    for k in models:
        lines.append(f"| {k} | {res['step_ms_median'][k]:.1f} | {res['optimizer_ms_median'][k]:.2f} | {drift[k]:.4f} |")
    md = "\n".join(lines) + "\n"
    print(md)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump(res, f, indent=1)
    with open(args.out + ".md", "w") as f:
        f.write(md)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.2))
        for k, v in drift_curve.items():
            ax.plot(range(1, len(v) + 1), v, label=k)
        ax.set_xlabel("step")
        ax.set_ylabel("cumulative movement of idle experts")
        ax.set_title("ghost updates: idle experts moved by stale momentum / decay")
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(args.out + ".png", dpi=100)
    except ImportError:
        pass


if __name__ == "__main__":
    main()
