"""The communication model's sweep for the README: flat vs hierarchical ZeRO, LLaMA-7B, 8 GPUs per node.

    python benchmarks/comm_model_plot.py                  # writes docs/comm_model.md and docs/comm_model.png
    python benchmarks/comm_model_plot.py --out /tmp       # elsewhere
    python benchmarks/comm_model_plot.py --no-plot        # the table only (no matplotlib needed)

Nothing is run or timed: the numbers are ``zeroadamw.estimate.comm_sweep`` (the model of docs/estimate.md,
"Communication model"), the same as ``zeroadamw estimate llama-7b --nodes 1,2,4,8,16,32,64,128 --gpus-per-node 8``
prints: bf16 params and bf16 gradients, ShardedAdamW's default buckets, default bandwidths per GPU
(``INTRA_NODE_GBPS`` inside a node, ``INTER_NODE_GBPS`` between nodes), one reduced backward per step.
Outputs: ``comm_model.md`` (the table) and ``comm_model.png`` (the time lower bound per step against K).
"""

from __future__ import annotations

import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "src"))

from zeroadamw import estimate as E  # noqa: E402

MODEL = "llama-7b"
GPUS_PER_NODE = 8
NODES = (1, 2, 4, 8, 16, 32, 64, 128)
COMMAND = (f"zeroadamw estimate {MODEL} --nodes {','.join(map(str, NODES))} --gpus-per-node {GPUS_PER_NODE} "
           "--dtype bf16")


def sweep() -> list[dict]:
    """One row per K (:func:`zeroadamw.estimate.sweep_rows`)."""
    spec = E.load_model(MODEL)
    return E.sweep_rows(E.comm_sweep(spec, NODES, GPUS_PER_NODE, "bf16"))


def markdown(rows: list[dict]) -> str:
    """docs/comm_model.md."""
    spec = E.load_model(MODEL)
    head = ("| K nodes | ranks | flat: inter-node GB | flat: ms | hier.: intra-node GB | hier.: inter-node GB "
            "| hier.: ms | hier.: ms, phases overlapped | flat ms / hier. ms | state GiB/rank, flat | "
            "state GiB/rank, hier. |")
    lines = [
        f"# Communication model: flat vs hierarchical ZeRO, LLaMA-7B, {GPUS_PER_NODE} GPUs per node", "",
        f"Written by `python benchmarks/comm_model_plot.py`; the same numbers as `{COMMAND}`. Nothing is measured:",
        f"this is the model of docs/estimate.md (\"Communication model\"), {spec.numel:,} params "
        f"(the `{MODEL}` preset), bf16 params and gradients, ShardedAdamW's default buckets, one reduced backward "
        f"per step, bandwidth per GPU and direction {E.INTRA_NODE_GBPS:g} GB/s inside a node (H100 SXM NVLink 4) "
        f"and {E.INTER_NODE_GBPS:g} GB/s between nodes (one 200 Gb/s NIC per GPU).", "",
        "Per rank, per optimizer step. *flat*: ZeRO over one group of all K x 8 ranks (a ring spanning nodes: all",
        "its bytes counted on the inter-node links); *hier.*: reduce-scatter and all-gather over the 8 GPUs of a",
        "node, all-reduce of the 1/8 shard over the K nodes. *ms*: the time lower bound, intra-node bytes /",
        "intra-node bandwidth + inter-node bytes / inter-node bandwidth (bandwidth only: no latency, no overlap",
        "with compute); *phases overlapped*: the larger of the two terms. GB = 1e9 bytes. *state*: optimizer",
        "state + fp32 master per rank, sharded over all ranks (flat) or over a node's 8 GPUs (hier.).", "",
        head, "|" + "---|" * (head.count("|") - 1),
    ]
    for r in rows:
        lines.append(f"| {r['nodes']} | {r['world_size']} | {r['flat_inter_gb'] + r['flat_intra_gb']:.2f}"
                     f"{'' if r['nodes'] > 1 else ' (intra)'} | {r['flat_ms']:.1f} | {r['hier_intra_gb']:.2f} "
                     f"| {r['hier_inter_gb']:.2f} | {r['hier_ms']:.1f} | {r['hier_overlapped_ms']:.1f} "
                     f"| {r['speedup']:.2f} | {r['flat_state_gib']:.2f} | {r['hier_state_gib']:.2f} |")
    lines += ["", "![time lower bound per step vs nodes](comm_model.png)", ""]
    return "\n".join(lines)


def plot(rows: list[dict], path: str) -> None:
    """The time lower bound per step against K, flat vs hierarchical (log-2 x axis)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = [r["nodes"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.plot(ks, [r["flat_ms"] for r in rows], "o-", label=f"flat ZeRO over K x {GPUS_PER_NODE} ranks")
    ax.plot(ks, [r["hier_ms"] for r in rows], "s-", label=f"hierarchical: shard {GPUS_PER_NODE} x replicate K")
    ax.plot(ks, [r["hier_overlapped_ms"] for r in rows], "s--", alpha=0.6,
            label="hierarchical, intra/inter phases overlapped")
    ax.set_xscale("log", base=2)
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.set_ylim(bottom=0)
    ax.set_xlabel(f"nodes K ({GPUS_PER_NODE} GPUs each)")
    ax.set_ylabel("communication time lower bound per step (ms)")
    ax.set_title(f"LLaMA-7B, bf16: {E.INTRA_NODE_GBPS:g} GB/s intra-node, {E.INTER_NODE_GBPS:g} GB/s inter-node "
                 "per GPU", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(HERE, "..", "docs"), help="output directory (default docs/)")
    ap.add_argument("--no-plot", action="store_true", help="write the table only")
    args = ap.parse_args(argv)
    rows = sweep()
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "comm_model.md"), "w") as f:
        f.write(markdown(rows))
    if not args.no_plot:
        plot(rows, os.path.join(args.out, "comm_model.png"))
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
