"""Fine-tune a LLaMA-class model with zeroadamw under HF Trainer (launch with accelerate, torchrun or deepspeed).

Flags follow transformers' run_clm.py (all TrainingArguments flags work too), plus ours:

    accelerate launch --config_file configs/ddp.yaml launch/finetune_llama.py \\
        --model_name_or_path meta-llama/Llama-3.2-1B --dataset data.txt --optimizer zeroadamw --stage 2 \\
        --bf16 --per_device_train_batch_size 4 --gradient_accumulation_steps 8 --max_steps 1000 --output_dir out

With no model and no dataset it runs the embedded default offline: a small LLaMA built from
configs/llama-tiny.json, trained byte-level on the docstrings of Python's standard library. On these CPU-only
machines (``make demo``):

    ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 launch/finetune_llama.py

At the end rank 0 prints a per-rank memory table (params / grads / optimizer state / peak) against what
torch.optim.AdamW would have needed, and writes ``<output_dir>/loss.png``, ``diagnostics.png`` (from
``diagnostics.jsonl``, which the diagnostics callback writes during training), ``log_history.jsonl`` and
``memory.json`` -- and lists them.
"""

from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import dataclass, field

if os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes"):
    # a CPU run: tell DeepSpeed so (accelerate imports it, when installed, to unwrap models), instead of it
    # probing for accelerators and printing "Setting accelerator to CPU" -- the same choice, silently
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CONFIG = os.path.join(HERE, "..", "configs", "llama-tiny.json")


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "a local model directory / hub id (offline cache); default: a small LLaMA "
                                        "built from --config_name"})
    config_name: str = field(default=DEFAULT_CONFIG, metadata={"help": "LlamaConfig JSON used when no model is given"})
    torch_dtype: str = field(default="auto", metadata={"help": "auto | float32 | bfloat16 | float16"})


@dataclass
class DataArguments:
    dataset: str = field(default="stdlib", metadata={"help": "'stdlib' (Python's docstrings, offline), a .txt/.jsonl "
                                                            "file, or a datasets hub name (if installed and cached)"})
    block_size: int = field(default=128, metadata={"help": "tokens per training sequence"})
    text_column: str = field(default="text")
    validation_fraction: float = field(default=0.02)


@dataclass
class ZeroArguments:
    optimizer: str = field(default="zeroadamw", metadata={"help": "zeroadamw, or any TrainingArguments optim name "
                                                                "(adamw_torch, adamw_torch_fused, adamw_bnb_8bit, lomo, ...)"})
    stage: int = field(default=2, metadata={"help": "ZeRO stage of ShardedAdamW (1 or 2)"})
    step_in_backward: bool = field(default=False, metadata={"help": "update each bucket during backward (LOMO-style)"})
    rule: str = field(default="adamw", metadata={"help": "adamw | lomo | adalomo"})
    decay: str = field(default="decoupled", metadata={"help": "decoupled | independent | l2"})
    bucket_size: int = field(default=2**23)
    lora: bool = field(default=False, metadata={"help": "train LoRA adapters only (peft)"})
    lora_r: int = field(default=16)
    lora_alpha: int = field(default=32)
    lora_targets: str = field(default="q_proj,k_proj,v_proj,o_proj")
    qlora: bool = field(default=False, metadata={"help": "4-bit base model (bitsandbytes, CUDA) + LoRA adapters"})
    wd_schedule: str = field(default="none", metadata={"help": "weight-decay schedule on top of the lr schedule: "
                                                              "none | linear | cosine (over max_steps)"})
    diagnostics: bool = field(default=True, metadata={"help": "log per-group param/grad norms, update/weight ratio "
                                                             "and effective decay (zeroadamw.diagnostics); "
                                                             "plotted to OUTPUT_DIR/diagnostics.png"})


# ------------------------------------------------------------------------------------------------------ data
class ByteTokenizer:
    """Byte-level tokenizer (vocab 256): available everywhere, no files."""

    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8", errors="ignore"))


def load_text(name: str, column: str) -> str:
    if name == "stdlib":
        sys.path.insert(0, os.path.join(HERE, "..", "src"))
        from zeroadamw.demo import stdlib_corpus

        return stdlib_corpus().decode("utf-8", errors="ignore")
    if os.path.isfile(name):
        if name.endswith(".jsonl"):
            with open(name) as f:
                return "\n\n".join(json.loads(line)[column] for line in f if line.strip())
        with open(name, encoding="utf-8", errors="ignore") as f:
            return f.read()
    try:
        import datasets
    except ImportError as e:
        raise SystemExit(f"--dataset {name!r}: not a file and the `datasets` package is not installed") from e
    ds = datasets.load_dataset(name, split="train")
    return "\n\n".join(ds[column])


class Blocks(torch.utils.data.Dataset):
    def __init__(self, ids: torch.Tensor, block: int):
        n = (len(ids) - 1) // block
        self.x = ids[: n * block].view(n, block)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"input_ids": self.x[i], "labels": self.x[i]}


# ----------------------------------------------------------------------------------------------------- model
def build_model(margs: ModelArguments, zargs: ZeroArguments, targs):
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    dtype = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[margs.torch_dtype]
    if zargs.qlora:
        if not torch.cuda.is_available():
            raise SystemExit("--qlora needs CUDA (bitsandbytes 4-bit); use --lora on CPU")
        from transformers import BitsAndBytesConfig

        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
        model = AutoModelForCausalLM.from_pretrained(margs.model_name_or_path, quantization_config=quant)
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model)
        tokenizer = AutoTokenizer.from_pretrained(margs.model_name_or_path)
    elif margs.model_name_or_path:
        model = AutoModelForCausalLM.from_pretrained(margs.model_name_or_path, torch_dtype=dtype or "auto")
        tokenizer = AutoTokenizer.from_pretrained(margs.model_name_or_path)
    else:
        torch.manual_seed(targs.seed)
        model = LlamaForCausalLM(LlamaConfig.from_json_file(margs.config_name))
        if dtype is not None:
            model = model.to(dtype)
        tokenizer = ByteTokenizer()
    if zargs.lora or zargs.qlora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=zargs.lora_r, lora_alpha=zargs.lora_alpha, lora_dropout=0.0,
                                                 target_modules=zargs.lora_targets.split(","), task_type="CAUSAL_LM"))
        if not any(p.requires_grad for p in model.parameters()):
            raise SystemExit("LoRA model has nothing trainable: check --lora_targets against the model's module names")
    return model, tokenizer


# ---------------------------------------------------------------------------------------------------- report
def memory_report(trainer, model) -> list[dict]:
    """Per-rank bytes: params, grads (held at the step), optimizer state, peak; and torch AdamW's for comparison."""
    import torch.distributed as dist

    from zeroadamw.integrations.accelerate import find_sharded_optimizer
    from zeroadamw.memory import peak_memory_bytes

    params = [p for p in model.parameters()]
    trainable = [p for p in params if p.requires_grad]
    opt = find_sharded_optimizer(trainer.optimizer)
    inner = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    if opt is not None:
        state = opt.state_bytes()
        grads = opt.engine.peak_grad_bytes or sum(p.numel() * p.element_size() for p in trainable)
        if opt.stage == 1 and not opt.step_in_backward:
            grads = sum(p.numel() * p.element_size() for p in trainable)
    else:
        state = sum(t.numel() * t.element_size() for st in inner.state.values() for k, t in st.items()
                    if torch.is_tensor(t) and k != "step")
        grads = sum(p.numel() * p.element_size() for p in trainable)
    row = {
        "params": sum(p.numel() * p.element_size() for p in params),
        "grads": grads,
        "optimizer_state": state,
        "torch_adamw_state": sum(p.numel() for p in trainable) * 8 if trainable and trainable[0].dtype == torch.float32
        else sum(p.numel() for p in trainable) * 12,
        # torch AdamW holds every gradient; with several processes DDP keeps a second copy in its buckets
        "torch_grads": sum(p.numel() * p.element_size() for p in trainable) * (2 if dist.is_initialized() and dist.get_world_size() > 1 else 1),
        "peak": peak_memory_bytes(trainer.args.device) or 0,
    }
    rows = [row]
    if dist.is_initialized() and dist.get_world_size() > 1:
        rows = [None] * dist.get_world_size()
        dist.all_gather_object(rows, row)
    return rows


def print_report(rows: list[dict], optimizer: str) -> None:
    mib = 2**20
    print(f"\nper-rank memory (MiB), {optimizer} vs what torch.optim.AdamW (+DDP) needs for the same model")
    print("(grads: most gradient memory held at once; torch: all gradients, + DDP's bucket copy with >1 process;")
    print(" peak: the process's peak RSS, Python and torch included, or the CUDA allocator's peak)")
    print("rank |  params |  grads (ours / torch) | optimizer state (ours / torch) |   peak")
    for r, v in enumerate(rows):
        print(f"{r:4d} | {v['params'] / mib:7.2f} | {v['grads'] / mib:8.2f} / {v['torch_grads'] / mib:8.2f}  | "
              f"{v['optimizer_state'] / mib:12.2f} / {v['torch_adamw_state'] / mib:12.2f}   | {v['peak'] / mib:7.1f}")


def plot_losses(history: list[dict], path: str) -> bool:
    """Train (and validation) loss against the step to ``path``; False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no loss plot")
        return False
    steps = [h["step"] for h in history if "loss" in h]
    losses = [h["loss"] for h in history if "loss" in h]
    evals = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, losses, color="black", label="train (mean over each logging interval)")
    if evals:
        ax.plot(*zip(*evals), "o-", color="tab:gray", label="validation")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats / token)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def loss_summary(history: list[dict], train_loss: float, metrics: dict) -> str:
    """The final line: the last logged train loss (and its steps), the run's mean, the validation loss."""
    logged = [h for h in history if "loss" in h and "step" in h]
    if logged:
        prev = logged[-2]["step"] if len(logged) > 1 else 0
        last = logged[-1]
        steps = f"step {last['step']}" if last["step"] - prev == 1 else f"steps {prev + 1}-{last['step']}"
        line = f"train loss {last['loss']:.3f} ({steps}; mean over the whole run {train_loss:.3f})"
    else:
        line = f"train loss, mean over the whole run {train_loss:.3f}"
    if metrics and "eval_loss" in metrics:
        line += (f", validation loss {metrics['eval_loss']:.3f} (perplexity {math.exp(metrics['eval_loss']):.2f}, "
                 "at the end)")
    return line


# ------------------------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> dict:
    from transformers import HfArgumentParser, Trainer, TrainingArguments

    sys.path.insert(0, os.path.join(HERE, "..", "src"))
    from zeroadamw.integrations.hf import ZeroTrainer

    parser = HfArgumentParser((ModelArguments, DataArguments, ZeroArguments, TrainingArguments))
    if argv is None and not any(a.startswith("--output_dir") for a in sys.argv[1:]):
        argv = sys.argv[1:] + ["--output_dir", "out/finetune_llama"]
    margs, dargs, zargs, targs = parser.parse_args_into_dataclasses(args=argv)
    if targs.report_to is None or targs.report_to == "all":
        targs.report_to = []
    if not torch.cuda.is_available():
        targs.use_cpu = True
        targs.dataloader_pin_memory = False  # nothing to pin for on a CPU (torch warns on every loader otherwise)
    main_process = targs.process_index == 0

    def say(msg: str) -> None:
        if main_process:
            print(msg, flush=True)

    say(f"building model: {margs.model_name_or_path or os.path.relpath(margs.config_name)}")
    model, tokenizer = build_model(margs, zargs, targs)
    say(f"  {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params "
        f"({sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6:.1f}M trainable)")
    say(f"tokenizing: dataset {dargs.dataset!r}")
    text = load_text(dargs.dataset, dargs.text_column)
    ids = torch.tensor(tokenizer.encode(text), dtype=torch.long)
    split = int(len(ids) * (1 - dargs.validation_fraction))
    train, val = Blocks(ids[:split], dargs.block_size), Blocks(ids[split:], dargs.block_size)
    say(f"  {len(ids):,} tokens: {len(train):,} training and {len(val):,} validation blocks of {dargs.block_size}")
    common = dict(model=model, args=targs, train_dataset=train, eval_dataset=val if len(val) else None)
    if zargs.wd_schedule not in ("none", "linear", "cosine"):
        raise ValueError(f"--wd_schedule must be none, linear or cosine, got {zargs.wd_schedule!r}")
    if zargs.optimizer == "zeroadamw":
        kw = dict(stage=zargs.stage, step_in_backward=zargs.step_in_backward, rule=zargs.rule, decay=zargs.decay,
                  bucket_size=zargs.bucket_size)
        if zargs.wd_schedule != "none":
            if targs.max_steps <= 0:
                raise ValueError("--wd_schedule needs --max_steps (the steps over which the decay goes to zero)")
            kw.update(wd_schedule=zargs.wd_schedule, wd_schedule_steps=targs.max_steps)
        trainer = ZeroTrainer(zeroadamw=kw, **common)
    else:
        targs.optim = zargs.optimizer
        trainer = Trainer(**common)
    diag_cb = None
    if zargs.diagnostics:
        from zeroadamw.diagnostics import attach

        diag_cb = attach(trainer)  # to OUTPUT_DIR/diagnostics.jsonl; one summary line per logging step
    from zeroadamw.memory import reset_peak_memory

    reset_peak_memory(targs.device)
    opt_name = (f"ShardedAdamW stage {zargs.stage}" + (", step in backward" if zargs.step_in_backward else "")
                if zargs.optimizer == "zeroadamw" else zargs.optimizer)
    say(f"training on {targs.world_size} process(es) ({targs.device.type}"
        + (", gloo" if targs.world_size > 1 and targs.device.type == "cpu" else "") + f"), {opt_name}, "
        + (f"{targs.max_steps} steps" if targs.max_steps > 0 else f"{targs.num_train_epochs:g} epochs")
        + f" of {targs.per_device_train_batch_size} x {dargs.block_size} tokens per process")
    result = trainer.train(resume_from_checkpoint=targs.resume_from_checkpoint)
    if len(val):
        say("evaluating on the validation blocks")
    metrics = trainer.evaluate() if len(val) else {}
    rows = memory_report(trainer, trainer.accelerator.unwrap_model(trainer.model))
    if trainer.is_world_process_zero():
        print("\n" + loss_summary(trainer.state.log_history, result.training_loss, metrics))
        print_report(rows, zargs.optimizer)
        out = targs.output_dir
        os.makedirs(out, exist_ok=True)
        wrote = []
        if plot_losses(trainer.state.log_history, os.path.join(out, "loss.png")):
            wrote.append(("loss.png", "train and validation loss"))
        with open(os.path.join(out, "log_history.jsonl"), "w") as f:
            for rec in trainer.state.log_history:
                if "step" in rec:
                    f.write(json.dumps(rec) + "\n")
        wrote.append(("log_history.jsonl", "Trainer's logs, one JSON record per line"))
        if diag_cb is not None and diag_cb.file is not None:
            from zeroadamw.plot import plot, read_log

            wrote.append((os.path.relpath(diag_cb.file, out), "diagnostics, one JSON record per logging step"))
            try:
                records = read_log(diag_cb.file)
                png = os.path.join(out, "diagnostics.png")
                plot(records, png, title="zeroadamw diagnostics", loss_unit="nats/token")
                wrote.append(("diagnostics.png", "per-group norms, update/weight ratio, effective decay, loss"))
            except ValueError as e:  # e.g. fewer steps than --logging_steps: nothing was logged
                print(f"no diagnostics plot: {e}")
            except ImportError:
                print("matplotlib not installed: no diagnostics plot")
        with open(os.path.join(out, "memory.json"), "w") as f:
            json.dump(rows, f, indent=1)
        wrote.append(("memory.json", "the per-rank memory table above"))
        print(f"\nwrote, in {os.path.abspath(out)}/:")
        width = max(len(os.path.join(out, n)) for n, _ in wrote)
        for name, what in wrote:
            print(f"  {os.path.join(out, name):<{width}}  {what}")
    return {"train_loss": result.training_loss, **metrics, "memory": rows}


if __name__ == "__main__":
    main()
