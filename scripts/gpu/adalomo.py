"""GPU tier, section "adalomo": ShardedAdamW(rule="adalomo") vs lomo_optim.AdaLomo on a small LLaMA on CUDA.

lomo_optim's AdaLomo allocates its state with ``.cuda()`` (CUDA only) and updates inside backward hooks; it is
driven the way its authors do (``fused_backward(loss, lr)``), with ``loss_scale=0`` (no loss scaling: an exact
comparison) and no clipping. ShardedAdamW runs the same hyperparameters, once updating in backward
(``step_in_backward=True``) and once at ``step()``. Reported: the max abs param difference after each step
(a measurement; ``within_1e-5`` says whether it stayed below 1e-5). Not installed: recorded as not run.
"""

from __future__ import annotations

import argparse
import copy

from common import emit, ensure_src_on_path


def tiny_llama(device):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False, attn_implementation="eager")
    return LlamaForCausalLM(cfg).to(device)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--device", default="cuda", help="cpu: a smoke test (lomo_optim's .cuda() made a no-op)")
    a = ap.parse_args()
    ensure_src_on_path()
    try:
        from lomo_optim import AdaLomo
    except ImportError as e:
        emit("adalomo_vs_lomo_optim", "not_run", f"lomo_optim not installed: AdaLomo comparison not run ({e})")
        return
    import torch

    from zeroadamw import ShardedAdamW

    if a.device == "cuda" and not torch.cuda.is_available():
        emit("adalomo_vs_lomo_optim", "not_run", "no CUDA device")
        return
    if a.device == "cpu":
        torch.Tensor.cuda = lambda self, *args, **kw: self  # smoke test only
    dev = torch.device(a.device)
    base = tiny_llama(dev)
    for sib in (True, False):
        ref_model, model = copy.deepcopy(base), copy.deepcopy(base)
        ref = AdaLomo(ref_model, lr=a.lr, loss_scale=0, weight_decay=a.weight_decay)
        opt = ShardedAdamW(model.parameters(), lr=a.lr, weight_decay=a.weight_decay, rule="adalomo",
                           step_in_backward=sib, bucket_size=4096)
        diffs = []
        for step in range(a.steps):
            g = torch.Generator().manual_seed(step)
            ids = torch.randint(0, 128, (2, 16), generator=g).to(dev)
            ref.fused_backward(ref_model(input_ids=ids, labels=ids).loss, a.lr)
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad()
            diffs.append(max((p.detach() - q.detach()).abs().max().item()
                             for p, q in zip(model.parameters(), ref_model.parameters())))
        moved = max((p.detach() - q.detach()).abs().max().item() for p, q in zip(model.parameters(), base.parameters()))
        worst = max(diffs)
        name = "adalomo_vs_lomo_optim" + ("_step_in_backward" if sib else "_at_step")
        emit(name, "ok", f"max abs param difference {worst:.3g} over {a.steps} steps (params moved {moved:.3g})",
             max_abs_diff=worst, per_step=diffs, params_moved=moved, within_1e_5=worst <= 1e-5,
             lr=a.lr, weight_decay=a.weight_decay, step_in_backward=sib, device=str(dev))


if __name__ == "__main__":
    main()
