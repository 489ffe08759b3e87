"""Two-process demo: train a small byte-level transformer LM with ShardedAdamW and show the memory it saves.

    torchrun --standalone --nproc_per_node 2 -m zeroadamw.demo          # CPU: gloo; CUDA: nccl
    python -m zeroadamw.demo                                             # one process

The corpus is the docstrings of Python's standard library (present on every machine, nothing downloaded),
byte-level (vocabulary 256). Every rank trains on its own batches; at the end each rank reports what it holds
against what ``torch.optim.AdamW`` (+ DDP) would have held for the same model.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import math
import os
import time

import torch
import torch.distributed as dist
from torch import nn

from .memory import adamw_state_bytes, peak_memory_bytes, reset_peak_memory
from .sharded_adamw import ShardedAdamW

STDLIB_MODULES = [
    "argparse", "ast", "asyncio", "base64", "bisect", "calendar", "collections", "contextlib", "copy", "csv",
    "dataclasses", "datetime", "decimal", "difflib", "email", "enum", "fractions", "functools", "glob", "gzip",
    "hashlib", "heapq", "hmac", "html", "http.client", "inspect", "io", "ipaddress", "itertools", "json",
    "logging", "mailbox", "math", "os", "pathlib", "pickle", "pprint", "queue", "random", "re", "shlex", "shutil",
    "socket", "sqlite3", "statistics", "string", "subprocess", "tarfile", "tempfile", "textwrap", "threading",
    "timeit", "tokenize", "typing", "unittest", "urllib.parse", "uuid", "warnings", "zipfile",
]


def stdlib_corpus() -> bytes:
    """Docstrings of the standard library modules above and their public members, deterministic order."""
    parts: list[str] = []
    for name in STDLIB_MODULES:
        try:
            mod = importlib.import_module(name)
        except Exception:  # noqa: BLE001 - a missing optional module just contributes nothing
            continue
        doc = inspect.getdoc(mod)
        if doc:
            parts.append(doc)
        for attr in sorted(dir(mod)):
            if attr.startswith("_"):
                continue
            obj = getattr(mod, attr, None)
            if inspect.isclass(obj) or inspect.isfunction(obj):
                d = inspect.getdoc(obj)
                if d and len(d) > 40:
                    parts.append(d)
    return "\n\n".join(parts).encode("utf-8", errors="ignore")


class TinyLM(nn.Module):
    """A pre-norm causal transformer over bytes (torch only)."""

    def __init__(self, d_model=256, n_layers=4, n_heads=4, seq_len=128, vocab=256):
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        self.pos = nn.Parameter(torch.zeros(seq_len, d_model))
        layer = nn.TransformerEncoderLayer(d_model, n_heads, 4 * d_model, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, n_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab, bias=False)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(seq_len), persistent=False)

    def forward(self, ids):
        t = ids.shape[1]
        h = self.embed(ids) + self.pos[:t]
        h = self.blocks(h, mask=self.mask[:t, :t], is_causal=True)
        return self.head(self.norm(h))


def decay_groups(model: nn.Module, weight_decay: float):
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim < 2 or "norm" in name or name == "pos" else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _mib(n: float | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:8.2f}"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--stage", type=int, default=2, choices=(1, 2))
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8, help="sequences per rank per step")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--bucket-size", type=int, default=2**18, help="elements per bucket (small: the demo model is small)")
    args = ap.parse_args(argv)

    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)  # before the process group: NCCL binds each rank to its own GPU
    if distributed:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank = dist.get_rank() if distributed else 0
    world = dist.get_world_size() if distributed else 1
    if device.type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))

    data = torch.frombuffer(bytearray(stdlib_corpus()), dtype=torch.uint8).long()
    split = int(0.95 * len(data))
    train, val = data[:split], data[split:]
    torch.manual_seed(0)  # identical initial weights on every rank
    model = TinyLM(args.d_model, args.layers, seq_len=args.seq_len).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    opt = ShardedAdamW(decay_groups(model, 0.1), lr=args.lr, betas=(0.9, 0.95), stage=args.stage,
                       bucket_size=args.bucket_size, max_grad_norm=1.0)
    warm = max(1, args.steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps)))

    def batch(source, step, r):
        g = torch.Generator().manual_seed(step * 1000 + r)
        starts = torch.randint(0, len(source) - args.seq_len - 1, (args.batch,), generator=g)
        x = torch.stack([source[s : s + args.seq_len + 1] for s in starts]).to(device)
        return x[:, :-1], x[:, 1:]

    if rank == 0:
        print(f"zeroadamw demo: {world} process(es) on {device.type}, byte-level LM with {n_params / 1e6:.2f}M params, "
              f"corpus {len(data) / 1e6:.2f} MB of stdlib docstrings, ShardedAdamW stage {args.stage}")
    reset_peak_memory(device)
    times, losses = [], []
    for step in range(args.steps):
        t0 = time.perf_counter()
        x, y = batch(train, step, rank)
        loss = nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad()
        sched.step()
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
        if step == 0:
            opt.engine.reset_peak()  # steady state: the first backward also settles the bucket order
        if rank == 0 and (step % 10 == 0 or step == args.steps - 1):
            print(f"step {step:4d}  loss {loss.item():.3f}  grad_norm {opt.grad_norm:.3f}  lr {sched.get_last_lr()[0]:.2e}")
    with torch.no_grad():
        vx, vy = batch(val, 10**6, 0)
        val_loss = nn.functional.cross_entropy(model(vx).flatten(0, 1), vy.flatten()).item()
    counters = opt.comm_counters()
    comm = sum(v["bytes"] for v in counters.values()) / args.steps
    trainable = [p for p in model.parameters() if p.requires_grad]
    row = torch.tensor([
        opt.state_bytes(),
        adamw_state_bytes(trainable),
        sum(p.numel() * p.element_size() for p in trainable),
        opt.engine.peak_full_bytes,
        peak_memory_bytes(device) or 0,
        sorted(times)[len(times) // 2] * 1e3,
        comm,
    ], dtype=torch.float64, device=device)  # on the model's device: the group's backend takes it (NCCL: CUDA)
    rows = [row]
    if distributed:
        rows = [torch.zeros_like(row) for _ in range(world)]
        dist.all_gather(rows, row)
    rows = [r.cpu() for r in rows]
    if rank == 0:
        mean = sum(losses) / len(losses)
        print(f"\nrank 0: train loss {losses[-1]:.3f} (the last step's batch; mean over the run {mean:.3f}), "
              f"validation loss {val_loss:.3f} (one batch after the last step; uniform bytes: {math.log(256):.3f})")
        print("\nper-rank memory (MiB) -- ShardedAdamW vs what torch.optim.AdamW (+DDP) holds for the same model")
        print("rank | optimizer state: ours | torch AdamW | saved | grads: full size | ours, peak full buckets "
              "| peak RSS | step ms | comm MB/step")
        for r, v in enumerate(rows):
            ours, theirs, gbytes, gpeak, peak, ms, cb = v.tolist()
            print(f"{r:4d} | {_mib(ours):>21} | {_mib(theirs):>11} | {100 * (1 - ours / theirs):4.0f}% | "
                  f"{_mib(gbytes):>16} | {_mib(gpeak) if args.stage == 2 and world > 1 else '(param.grad)':>23} | "
                  f"{_mib(peak):>8} | {ms:7.1f} | {cb / 1e6:12.2f}")
        print(f"\nstate per rank = 1/{world} of AdamW's (+ < {world} padding elements per bucket); "
              "peak RSS includes the Python/torch runtime.")
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
