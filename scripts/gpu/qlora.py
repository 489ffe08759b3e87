"""GPU tier, section "qlora": the first steps of the QLoRA recipe (launch/qlora.sh) on one GPU, offline.

launch/qlora.sh runs ``launch/finetune_llama.py --qlora`` (4-bit NF4 base via bitsandbytes + bf16 LoRA adapters
trained by ShardedAdamW stage 2) on a hub model. There is no network here, so this builds a small LLaMA checkpoint
and a byte-level tokenizer in ``$OUT/qlora/model`` (from a LlamaConfig; nothing downloaded), writes a text file from
this repository's docs, and calls the script's ``main()`` in this process with the recipe's flags (block size and
steps cut down; one process, without ``accelerate launch``). Needs bitsandbytes (``scripts/wheels/*.whl`` are
installed first by gpu_check.py when present); without it: recorded as not run.
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import math
import os
import sys

from common import ROOT, emit, ensure_src_on_path


def make_tokenizer(path: str):
    """A byte-level tokenizer (256 byte tokens + <eos>), saved in HF format: no files needed from anywhere."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet)}
    vocab["<eos>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")
    fast.model_max_length = 1 << 30  # the corpus is encoded in one call
    fast.save_pretrained(path)
    return len(vocab)


def make_model(path: str, vocab: int) -> int:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=256, intermediate_size=688, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024,
                      tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(path)
    return sum(p.numel() for p in model.parameters())


def make_text(path: str, max_bytes: int = 400_000) -> int:
    parts = []
    for f in ["README.md", *sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))]:
        try:
            with open(os.path.join(ROOT, f), encoding="utf-8", errors="ignore") as fh:
                parts.append(fh.read())
        except OSError:
            continue
    text = "\n\n".join(parts)
    while len(text) < 50_000:  # enough blocks for a few steps whatever is in docs/
        text += "\n\n" + text if text else "zeroadamw " * 1000
    text = text[:max_bytes]
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(text)
    return len(text)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--block-size", type=int, default=256)
    ap.add_argument("--cpu-lora-smoke", action="store_true", help="CPU: the same plumbing with --lora (no 4-bit)")
    a = ap.parse_args()
    ensure_src_on_path()
    out = os.path.join(os.environ.get("OUT") or os.path.join(ROOT, "out", "gpu"), "qlora")
    if not a.cpu_lora_smoke:
        if importlib.util.find_spec("bitsandbytes") is None:
            emit("qlora_first_steps", "not_run", "bitsandbytes not installed: QLoRA not run")
            return
        import torch

        if not torch.cuda.is_available():
            emit("qlora_first_steps", "not_run", "no CUDA device: QLoRA (bitsandbytes 4-bit) not run")
            return
        import bitsandbytes

        bnb_version = getattr(bitsandbytes, "__version__", "?")
    else:
        bnb_version = None
    model_dir, data = os.path.join(out, "model"), os.path.join(out, "data.txt")
    os.makedirs(model_dir, exist_ok=True)
    vocab = make_tokenizer(model_dir)
    n_params = make_model(model_dir, vocab)
    n_text = make_text(data)
    spec = importlib.util.spec_from_file_location("finetune_llama", os.path.join(ROOT, "launch", "finetune_llama.py"))
    ft = importlib.util.module_from_spec(spec)
    sys.modules["finetune_llama"] = ft  # its dataclasses look their module up there
    spec.loader.exec_module(ft)
    import dataclasses

    from transformers import TrainingArguments

    # launch/qlora.sh passes --warmup_ratio 0.03; transformers 5 removed it (warmup_steps < 1 is a ratio there)
    has_ratio = "warmup_ratio" in {f.name for f in dataclasses.fields(TrainingArguments)}
    warmup = ["--warmup_ratio", "0.03"] if has_ratio else ["--warmup_steps", "0.03"]
    argv = ["--model_name_or_path", model_dir, "--dataset", data, "--lora_r", "16", "--lora_alpha", "32",
            "--optimizer", "zeroadamw", "--stage", "2", "--learning_rate", "2e-4", "--lr_scheduler_type", "cosine",
            *warmup, "--per_device_train_batch_size", "4", "--block_size", str(a.block_size),
            "--gradient_checkpointing", "true", "--max_steps", str(a.steps), "--logging_steps", "1",
            "--save_strategy", "no", "--report_to", "none", "--diagnostics", "false", "--seed", "0",
            "--output_dir", os.path.join(out, "run")]
    argv += ["--lora"] if a.cpu_lora_smoke else ["--qlora", "--bf16"]
    result = ft.main(argv)
    loss = float(result.get("train_loss", float("nan")))
    mem = result.get("memory") or [{}]
    ok = math.isfinite(loss)
    emit("qlora_first_steps", "pass" if ok else "fail",
         f"{a.steps} steps, train loss {loss:.3f}" + ("" if ok else " (not finite)"),
         train_loss=loss, eval_loss=result.get("eval_loss"), memory_rank0=mem[0], steps=a.steps,
         block_size=a.block_size, model_params=n_params, text_chars=n_text, bitsandbytes=bnb_version,
         argv=argv, warmup_ratio_flag_accepted=has_ratio,
         note="one process, launch/finetune_llama.py main() with launch/qlora.sh's flags"
              + ("" if has_ratio else "; --warmup_ratio (in qlora.sh) is rejected by this transformers: used "
                 "--warmup_steps 0.03"))


if __name__ == "__main__":
    main()
