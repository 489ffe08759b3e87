"""GPU tier, section "mem": CUDA peak memory and step time of one optimizer on a ~1B-parameter LLaMA.

One variant per process (``--variant``), so every peak starts from an empty allocator and a crash or an
out-of-memory in one variant cannot touch the others. The model is built from a LlamaConfig (nothing downloaded)
directly on the GPU, in bf16, with activation checkpointing (non-reentrant), and trained on random tokens.

Reported per variant (bytes are ``torch.cuda`` allocator bytes, not nvidia-smi's):

* ``model_bytes`` -- allocated after the model and the batch exist, before the optimizer's first step;
* ``first_step_peak_bytes`` -- ``max_memory_allocated`` over the first step (forward, backward, step: the
  optimizer state is allocated there), after ``reset_peak_memory_stats``;
* ``steady_peak_bytes`` -- the same over the timed steps (after the warm-up);
* ``state_bytes`` -- optimizer state (ShardedAdamW: ``state_bytes()``; torch: its state tensors);
* ``step_ms`` -- median (and min / max) wall time of ``--steps`` steps after ``--warmup`` warm-up steps, each
  between two ``torch.cuda.synchronize()``.

torch.optim.AdamW keeps its moments in the param dtype (bf16 here); ShardedAdamW keeps an fp32 master and fp32
moments by default (``master_dtype=torch.float32``), so the ``*_bf16_state`` variants (``master_dtype=None``: state
in bf16, like torch's) are the like-for-like comparison with torch.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

from common import emit, ensure_src_on_path

VARIANTS = {
    "torch_adamw_fused": None,
    "stage2": dict(stage=2),
    "step_in_backward": dict(stage=2, step_in_backward=True),
    "step_in_backward_clip": dict(stage=2, step_in_backward=True, max_grad_norm=1.0),
    "stage2_bf16_state": dict(stage=2, master_dtype=None),
    "step_in_backward_bf16_state": dict(stage=2, step_in_backward=True, master_dtype=None),
}


def build_model(a):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.intermediate,
                      num_hidden_layers=a.layers, num_attention_heads=a.heads, num_key_value_heads=a.kv_heads,
                      max_position_embeddings=max(2048, a.seq), tie_word_embeddings=False, use_cache=False)
    torch.manual_seed(0)
    with torch.device(a.device):
        model = LlamaForCausalLM(cfg)
    model.to(torch.bfloat16)
    model.config.use_cache = False
    if a.checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return model


def build_optimizer(model, variant: str, a):
    import torch

    from zeroadamw import ShardedAdamW

    kw = VARIANTS[variant]
    if kw is None:
        return torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=0.1, fused=True)
    return ShardedAdamW(model.parameters(), lr=a.lr, weight_decay=0.1, bucket_size=a.bucket_size, **kw)


def state_bytes(opt) -> int:
    import torch

    if hasattr(opt, "state_bytes"):
        return int(opt.state_bytes())
    return sum(t.numel() * t.element_size() for st in opt.state.values() for k, t in st.items()
               if torch.is_tensor(t) and k != "step")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--variant", required=True, choices=list(VARIANTS))
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--intermediate", type=int, default=5632)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=16)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--bucket-size", type=int, default=2**23)
    ap.add_argument("--no-checkpointing", dest="checkpointing", action="store_false")
    ap.add_argument("--device", default="cuda", help="cpu: a smoke test of this script (memory numbers are 0)")
    a = ap.parse_args()
    ensure_src_on_path()
    import torch

    if a.device == "cuda" and not torch.cuda.is_available():
        emit(a.variant, "not_run", "no CUDA device")
        return
    dev = torch.device(a.device)
    cuda = dev.type == "cuda"

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    def allocated() -> int:
        return torch.cuda.memory_allocated() if cuda else 0

    def peak() -> int:
        return torch.cuda.max_memory_allocated() if cuda else 0

    def reset_peak() -> None:
        if cuda:
            torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    model = build_model(a)
    n_params = sum(p.numel() for p in model.parameters())
    ids = torch.randint(0, a.vocab, (a.batch, a.seq), device=dev)
    opt = build_optimizer(model, a.variant, a)
    sync()
    if cuda:
        torch.cuda.empty_cache()
    build_s = time.perf_counter() - t0
    model_bytes = allocated()
    losses: list[float] = []

    def step() -> None:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach())

    reset_peak()
    t = time.perf_counter()
    step()
    sync()
    first_s = time.perf_counter() - t
    first_peak = peak()
    for _ in range(max(0, a.warmup - 1)):
        step()
    sync()
    reset_peak()
    times = []
    for _ in range(a.steps):
        sync()
        t = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t)
    steady_peak = peak()
    losses_f = [float(x) for x in losses]
    finite = all(math.isfinite(x) for x in losses_f)
    gib = 2**30
    summary = (f"first-step peak {first_peak / gib:.2f} GiB, steady peak {steady_peak / gib:.2f} GiB, "
               f"state {state_bytes(opt) / gib:.2f} GiB, step {1e3 * statistics.median(times):.0f} ms")
    emit(a.variant, "ok" if finite else "fail", summary if finite else "non-finite loss: " + summary,
         optimizer=a.variant, config=dict(hidden=a.hidden, layers=a.layers, intermediate=a.intermediate,
                                          vocab=a.vocab, heads=a.heads, kv_heads=a.kv_heads, seq=a.seq,
                                          batch=a.batch, dtype="bfloat16", checkpointing=a.checkpointing,
                                          bucket_size=a.bucket_size),
         params=n_params, param_bytes=sum(p.numel() * p.element_size() for p in model.parameters()),
         model_bytes=model_bytes, first_step_peak_bytes=first_peak, steady_peak_bytes=steady_peak,
         state_bytes=state_bytes(opt), after_bytes=allocated(), device=str(dev),
         step_ms=1e3 * statistics.median(times), step_ms_min=1e3 * min(times), step_ms_max=1e3 * max(times),
         first_step_s=first_s, build_s=build_s, losses=losses_f,
         grad_norm=getattr(opt, "grad_norm", None))


if __name__ == "__main__":
    main()
