"""Fine-tune a LLaMA-class model with zeroadamw under HF Trainer (launch with accelerate, torchrun or deepspeed).

Flags follow transformers' run_clm.py (all TrainingArguments flags work too), plus ours:

    accelerate launch --config_file configs/ddp.yaml launch/finetune_llama.py \\
        --model_name_or_path meta-llama/Llama-3.2-1B --dataset data.txt --optimizer zeroadamw --stage 2 \\
        --bf16 --per_device_train_batch_size 4 --gradient_accumulation_steps 8 --max_steps 1000 --output_dir out

With no model and no dataset it runs the embedded default offline: a small LLaMA built from
configs/llama-tiny.json, trained byte-level on the docstrings of Python's standard library. On these CPU-only
machines (``make demo``):

    ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 launch/finetune_llama.py

QLoRA runs there too (bitsandbytes' NF4 layers on CPU): ``--qlora`` builds that small LLaMA, saves it to
``<output_dir>/qlora_base/`` and loads it 4-bit; ``--state_dtype fp32|bf16|int8`` and ``--kahan_sum`` (with
``--torch_dtype bfloat16``: bf16 adapters) choose how ShardedAdamW stores the adapters' state.

Beyond one node, ``--mesh hierarchical`` shards ShardedAdamW over a 2-D ("replicate", "shard") DeviceMesh
(``zeroadamw.mesh_from_env``: the LOCAL_WORLD_SIZE ranks of a node -- or ``--shard_size`` -- shard, the nodes
replicate), e.g. on each of 2 hosts (launch/multinode_torchrun.sh, launch/slurm_multinode.sbatch,
configs/multinode_accelerate.yaml):

    torchrun --nnodes 2 --nproc_per_node 8 --node_rank R --rdzv-backend c10d --rdzv-endpoint HOST0:29500 \
        --rdzv-id job1 launch/finetune_llama.py --mesh hierarchical ...

It then counts one step's collectives (default the last; ``--comm_report_step N``; ``--comm_report true`` does
it for ``--mesh flat`` too), prints them per mesh dimension next to ``zeroadamw.estimate.comm_bytes``' model and
writes ``comm_bytes.json`` (with a digest of every rank's final params).

At the end rank 0 prints a per-rank memory table (params / grads / optimizer state / peak) against what
torch.optim.AdamW would have needed, and writes ``<output_dir>/loss.png``, ``diagnostics.png`` (from
``diagnostics.jsonl``, which the diagnostics callback writes during training), ``log_history.jsonl``,
``memory.json`` (with the optimizer state by moment storage) and ``model.json`` (the trainable params, the 4-bit
layers) -- and lists them.
"""

from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import dataclass, field

import torch  # noqa: E402

if not torch.cuda.is_available():
    # no GPU: a CPU run, whichever launcher started it. TrainingArguments set the device up while the arguments
    # are parsed, from accelerate's state: under plain torchrun (no ACCELERATE_USE_CPU, as accelerate launch's
    # CPU config sets) every rank would find no GPU and train alone, at world size 1
    os.environ.setdefault("ACCELERATE_USE_CPU", "true")
if os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes"):
    # a CPU run: tell DeepSpeed so (accelerate imports it, when installed, to unwrap models), instead of it
    # probing for accelerators and printing "Setting accelerator to CPU" -- the same choice, silently
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

from transformers import TrainerCallback  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CONFIG = os.path.join(HERE, "..", "configs", "llama-tiny.json")


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "a local model directory / hub id (offline cache); default: a small LLaMA "
                                        "built from --config_name (with --qlora: built, saved to "
                                        "OUTPUT_DIR/qlora_base/ and loaded 4-bit from there)"})
    config_name: str = field(default=DEFAULT_CONFIG, metadata={"help": "LlamaConfig JSON used when no model is given"})
    torch_dtype: str = field(default="auto", metadata={"help": "auto | float32 | bfloat16 | float16; with --qlora: "
                                                                "the LoRA adapters' dtype and the 4-bit layers' "
                                                                "compute dtype (auto: fp32 adapters, bf16 compute)"})


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
    state_dtype: str | None = field(
        default=None, metadata={"help": "storage of ShardedAdamW's Adam moments: fp32 | bf16 | int8 (block-wise "
                                        "8-bit; params of < 4096 elements keep fp32); default: automatic (the "
                                        "master's dtype, else the param's)", "choices": ["fp32", "bf16", "int8"]})
    kahan_sum: bool = field(default=False, metadata={"help": "bf16/fp16 trainable params: a Kahan compensation "
                                                             "buffer (2 bytes/param) instead of the fp32 master "
                                                             "(4 bytes); sets --master_dtype none. No effect on "
                                                             "fp32 params"})
    master_dtype: str = field(default="auto", metadata={"help": "master weights of bf16/fp16 trainable params: "
                                                               "auto (fp32, none with --kahan_sum) | fp32 | none",
                                                       "choices": ["auto", "fp32", "none"]})
    lora: bool = field(default=False, metadata={"help": "train LoRA adapters only (peft)"})
    lora_r: int = field(default=16)
    lora_alpha: int = field(default=32)
    lora_targets: str = field(default="q_proj,k_proj,v_proj,o_proj")
    qlora: bool = field(default=False, metadata={"help": "4-bit NF4 base model (bitsandbytes; CUDA, or CPU: "
                                                        "checked with bitsandbytes 0.50) + LoRA adapters. Loads "
                                                        "--model_name_or_path 4-bit; without one, the small LLaMA "
                                                        "of --config_name is built (seeded), saved to "
                                                        "OUTPUT_DIR/qlora_base/ and loaded 4-bit from there"})
    wd_schedule: str = field(default="none", metadata={"help": "weight-decay schedule on top of the lr schedule: "
                                                              "none | linear | cosine (over max_steps)"})
    diagnostics: bool = field(default=True, metadata={"help": "log per-group param/grad norms, update/weight ratio "
                                                             "and effective decay (zeroadamw.diagnostics); "
                                                             "plotted to OUTPUT_DIR/diagnostics.png"})
    mesh: str = field(default="flat", metadata={"help": "flat: shard over all ranks (one group); hierarchical: a "
                                                       "2-D mesh (replicate, shard) from torchrun's environment "
                                                       "(zeroadamw.mesh_from_env): the ranks of a node shard, the "
                                                       "nodes replicate (--optimizer zeroadamw only)",
                                               "choices": ["flat", "hierarchical"]})
    shard_size: int | None = field(default=None, metadata={"help": "--mesh hierarchical: ranks per shard row "
                                                                  "(default LOCAL_WORLD_SIZE, the ranks of a node)"})
    comm_report: bool = field(default=False, metadata={"help": "count the collectives of one training step and "
                                                              "compare them with zeroadamw.estimate.comm_bytes "
                                                              "(always on with --mesh hierarchical); to "
                                                              "OUTPUT_DIR/comm_bytes.json"})
    comm_report_step: int = field(default=0, metadata={"help": "the step --comm_report counts (1-based global "
                                                              "step); 0: the run's last step"})


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
QLORA_BASE_DIR = "qlora_base"  # under --output_dir: the default model, saved so that it can be loaded 4-bit


def _dist_barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def save_default_base(margs: ModelArguments, targs) -> str:
    """--qlora without --model_name_or_path: build the small LLaMA of --config_name (seed --seed: the same weights
    on every rank and at every run, so a resumed run gets the base it was trained on), save it to
    OUTPUT_DIR/qlora_base/ (the main process writes, the others wait) and return that directory."""
    from transformers import LlamaConfig, LlamaForCausalLM

    path = os.path.join(targs.output_dir, QLORA_BASE_DIR)
    writer = targs.local_process_index == 0 if targs.save_on_each_node else targs.process_index == 0
    if writer:
        torch.manual_seed(targs.seed)
        base = LlamaForCausalLM(LlamaConfig.from_json_file(margs.config_name))
        base.save_pretrained(path, safe_serialization=True)
        del base
    _dist_barrier()
    return path


def qlora_dtypes(torch_dtype: str) -> tuple[torch.dtype | None, torch.dtype]:
    """(LoRA adapter dtype or None for PEFT's default fp32, 4-bit compute dtype) for --torch_dtype with --qlora."""
    return {"auto": (None, torch.bfloat16), "float32": (None, torch.float32),
            "bfloat16": (torch.bfloat16, torch.bfloat16), "float16": (torch.float16, torch.float16)}[torch_dtype]


def count_linear4bit(model) -> int:
    try:
        import bitsandbytes as bnb
    except ImportError:
        return 0
    return sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())


def build_model(margs: ModelArguments, zargs: ZeroArguments, targs):
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    dtype = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[margs.torch_dtype]
    adapter_dtype = None
    if zargs.qlora:
        try:
            import bitsandbytes  # noqa: F401
        except ImportError as e:
            raise SystemExit("--qlora needs bitsandbytes (pip install bitsandbytes); or use --lora") from e
        from peft import prepare_model_for_kbit_training
        from transformers import BitsAndBytesConfig

        adapter_dtype, compute = qlora_dtypes(margs.torch_dtype)
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute)
        # every process holds the whole (4-bit) model on its own device: CUDA -- its local rank's GPU, as HF
        # expects for data parallelism (not "auto", which would spread one model over the GPUs); CPU -- "cpu"
        device_map = {"": targs.local_process_index} if torch.cuda.is_available() else "cpu"
        path = margs.model_name_or_path or save_default_base(margs, targs)
        model = AutoModelForCausalLM.from_pretrained(path, quantization_config=quant, device_map=device_map)
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=targs.gradient_checkpointing)
        if not torch.cuda.is_available():
            # bitsandbytes' CPU inference path (AVX512-BF16 machines) repacks a Linear4bit's weight in place at its
            # first no-grad forward in eval mode -- asserting out_features % 32 == 0 (the small LLaMA's 688 is
            # not) -- and training forwards after it would get the repacked weight: keep the training layout
            import bitsandbytes as bnb

            for m in model.modules():
                if isinstance(m, bnb.nn.Linear4bit):
                    m.support_avx512bf16_for_cpu = False
            # the weights that stay unquantized (embeddings, norms, lm_head) are views of the checkpoint's memory
            # map, which keeps every page of the (fp32) file that the 4-bit load read resident: copy them out,
            # and the map -- the size of the unquantized model -- goes
            for p in model.parameters():
                if type(p).__name__ != "Params4bit":
                    p.data = p.data.clone()
        tokenizer = AutoTokenizer.from_pretrained(path) if margs.model_name_or_path else ByteTokenizer()
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

        torch.manual_seed(targs.seed)  # the same adapters on every rank
        model = get_peft_model(model, LoraConfig(r=zargs.lora_r, lora_alpha=zargs.lora_alpha, lora_dropout=0.0,
                                                 target_modules=zargs.lora_targets.split(","), task_type="CAUSAL_LM"),
                               autocast_adapter_dtype=adapter_dtype is None)
        if adapter_dtype is not None:  # --qlora --torch_dtype bfloat16: bf16 adapters (PEFT would upcast to fp32)
            for p in model.parameters():
                if p.requires_grad:
                    p.data = p.data.to(adapter_dtype)
        if not any(p.requires_grad for p in model.parameters()):
            raise SystemExit("LoRA model has nothing trainable: check --lora_targets against the model's module names")
    return model, tokenizer


def zeroadamw_precision(zargs: ZeroArguments, model) -> tuple[dict, list[str]]:
    """ShardedAdamW's precision keywords from --state_dtype / --kahan_sum / --master_dtype, and notes to print.
    --kahan_sum selects master_dtype=None (the compensation buffer replaces the master)."""
    kw, notes = {}, []
    if zargs.state_dtype is not None:
        kw["state_dtype"] = zargs.state_dtype
    if zargs.kahan_sum:
        if zargs.master_dtype == "fp32":
            raise SystemExit("--kahan_sum replaces the fp32 master by a compensation buffer: drop --master_dtype fp32 "
                             "(--kahan_sum sets --master_dtype none)")
        kw.update(kahan_sum=True, master_dtype=None)
        if not any(p.requires_grad and p.dtype in (torch.bfloat16, torch.float16) for p in model.parameters()):
            notes.append("note: --kahan_sum applies to bf16/fp16 trainable params; these are all float32, so it "
                         "changes nothing here (fp32 moments, no master, no compensation). For bf16 LoRA adapters "
                         "pass --torch_dtype bfloat16")
    elif zargs.master_dtype == "none":
        kw["master_dtype"] = None
    if zargs.state_dtype == "int8":
        small = sum(p.numel() for p in model.parameters() if p.requires_grad and p.numel() < 4096)
        if small:
            total = sum(p.numel() for p in model.parameters() if p.requires_grad)
            notes.append(f"note: --state_dtype int8 quantizes params of >= 4096 elements; {small:,} of the "
                         f"{total:,} trainable elements are in smaller params, which keep fp32 moments")
    return kw, notes


def keeping_trainable_dtypes(trainer_cls, model):
    """``trainer_cls`` whose resume keeps the trainable params' dtypes: Trainer reloads PEFT adapters with
    ``load_adapter``, which upcasts them to fp32 (``autocast_adapter_dtype``) -- a --torch_dtype bfloat16 run
    would resume with fp32 adapters (and its Kahan / master state converted to fp32's). Cast back, before the
    optimizer is built."""
    dtypes = {n: p.dtype for n, p in model.named_parameters() if p.requires_grad}

    class Trainer(trainer_cls):
        def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
            super()._load_from_checkpoint(resume_from_checkpoint, model=model)
            for n, p in (self.model if model is None else model).named_parameters():
                if n in dtypes and p.dtype != dtypes[n]:
                    p.data = p.data.to(dtypes[n])

    Trainer.__name__ = Trainer.__qualname__ = trainer_cls.__name__
    return Trainer


# ------------------------------------------------------------------------------------------------------ mesh
COMM_REPORT_FILE = "comm_bytes.json"


def build_mesh(zargs: ZeroArguments, targs):
    """--mesh hierarchical: the ("replicate", "shard") DeviceMesh of zeroadamw.mesh_from_env (torchrun's
    LOCAL_WORLD_SIZE ranks -- or --shard_size -- per shard row, the nodes replicate); --mesh flat: None."""
    if zargs.mesh not in ("flat", "hierarchical"):
        raise SystemExit(f"--mesh must be flat or hierarchical, got {zargs.mesh!r}")
    if zargs.mesh == "flat":
        if zargs.shard_size is not None:
            raise SystemExit("--shard_size is an option of --mesh hierarchical (--mesh flat shards over all ranks)")
        return None
    if zargs.optimizer != "zeroadamw":
        raise SystemExit(f"--mesh hierarchical is an option of --optimizer zeroadamw (ShardedAdamW's device_mesh=); "
                         f"--optimizer {zargs.optimizer} does not shard over a mesh: drop --mesh")
    if targs.deepspeed or os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() in ("1", "true", "yes"):
        raise SystemExit("--mesh hierarchical does not apply under DeepSpeed (DeepSpeed partitions the optimizer "
                         "itself; zeroadamw's plain AdamW is its client): drop --mesh, or --deepspeed")
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or targs.world_size < 2:
        raise SystemExit("--mesh hierarchical needs a distributed launch (torchrun, or accelerate launch, of several "
                         "processes): it shards over each node's ranks and replicates over the nodes")
    from zeroadamw import mesh_from_env

    try:
        return mesh_from_env(targs.device.type, shard_size=zargs.shard_size)
    except ValueError as e:
        raise SystemExit(f"--mesh hierarchical: {e}") from e


def reduced_backwards(opt, micro_batches: int) -> int:
    """Backward passes of one optimizer step that reduce gradients: with gradient accumulation HF Trainer runs
    every micro-batch but the last under the optimizer's no_sync(), where ShardedAdamW (stage 1 and 2) keeps
    the gradients in param.grad and communicates nothing -- one reduction per step; with step_in_backward every
    backward reduces (into the sharded fp32 accumulator)."""
    return micro_batches if opt.step_in_backward else 1


def _sha256_params(model) -> str:
    import hashlib

    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class CommReport(TrainerCallback):
    """The communication of one steady-state optimizer step (default: the run's last), per rank and mesh
    dimension, against zeroadamw.estimate.comm_bytes' model.

    The optimizer's counters are reset at the step's start (``on_step_begin``: before its first micro-batch) and
    read at its end (``on_step_end``, before the diagnostics' collective and before logging / saving). Rank 0
    prints counted / model bytes per dimension; at the end of training it writes ``OUTPUT_DIR/comm_bytes.json``
    with every rank's counters and a SHA-256 of every rank's final params (equal on all ranks: the rows of a
    mesh stay identical). The callback goes first in Trainer's list, so no other callback's collective is
    counted."""

    def __init__(self, trainer, step: int = 0):
        self.trainer, self.step = trainer, step
        self.target = None
        self.active = False
        self.record: dict | None = None

    def _opt(self):
        from zeroadamw.integrations.accelerate import find_sharded_optimizer

        return find_sharded_optimizer(self.trainer.optimizer)

    def on_train_begin(self, args, state, control, **kwargs):
        self.target = self.step if self.step > 0 else state.max_steps

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step + 1 == self.target and self._opt() is not None:
            self._opt().reset_comm_counters()
            self.active = True

    def on_step_end(self, args, state, control, **kwargs):
        if not self.active:
            return
        self.active = False
        import torch.distributed as dist

        from zeroadamw.estimate import comm_bytes

        opt = self._opt()
        counted = opt.comm_counters(by_dim=True)
        comm = opt.comm
        shard = comm.world_size
        replicate = comm.replicate.world_size if hasattr(comm, "replicate") else 1
        micro = int(getattr(self.trainer, "current_gradient_accumulation_steps", None)
                    or args.gradient_accumulation_steps)
        reduced = reduced_backwards(opt, micro)
        buckets = [(b.layout.padded, b.reduce_dtype.itemsize, b.dtype.itemsize) for b in opt.engine.buckets]
        model = comm_bytes(buckets, shard=shard, replicate=replicate, micro_batches=reduced)
        mine = {"rank": args.process_index, "node": int(os.environ.get("GROUP_RANK", 0)),  # torchrun's node
                "local_rank": args.local_process_index,
                "coords": {"replicate": comm.replicate.rank if hasattr(comm, "replicate") else 0, "shard": comm.rank},
                "counted": counted}
        ranks = [None] * dist.get_world_size() if dist.is_initialized() else [mine]
        if dist.is_initialized():
            dist.all_gather_object(ranks, mine)
        mismatches = []
        for r in ranks:
            for dim, ops in model.items():
                for op, want in ops.items():
                    got = r["counted"].get(dim, {}).get(op, {}).get("bytes", 0)
                    if got != want:
                        mismatches.append(f"rank {r['rank']} {dim}/{op}: counted {got:,}, model {want:,}")
        self.record = {
            "step": state.global_step, "mesh": {"replicate": replicate, "shard": shard},
            "layout": "hierarchical" if hasattr(comm, "replicate") else "flat",
            "micro_batches": micro, "reduced_backwards": reduced, "stage": opt.stage,
            "step_in_backward": bool(opt.step_in_backward), "buckets": buckets, "model": model,
            "ranks": ranks, "match": not mismatches, "mismatches": mismatches,
        }
        if args.process_index == 0:
            print(self.summary(), flush=True)

    def summary(self) -> str:
        rec = self.record
        r0 = rec["ranks"][0]["counted"]
        where = {"shard": "intra-node" if rec["layout"] == "hierarchical" else "all ranks",
                 "replicate": "inter-node", "world": "all ranks"}
        layout = (f"hierarchical mesh {rec['mesh']['replicate']} x {rec['mesh']['shard']}"
                  if rec["layout"] == "hierarchical" else f"flat sharding over {rec['mesh']['shard']} ranks")
        lines = [f"\ncommunication of step {rec['step']} per rank ({layout}, {rec['reduced_backwards']} reducing "
                 f"backward(s) of {rec['micro_batches']} micro-batch(es)), bytes counted by rank 0 / "
                 "zeroadamw.estimate.comm_bytes:"]
        for dim in ("shard", "replicate", "world"):
            size = {"shard": rec["mesh"]["shard"], "replicate": rec["mesh"]["replicate"],
                    "world": rec["mesh"]["shard"] * rec["mesh"]["replicate"]}[dim]
            ops = sorted(set(r0.get(dim, {})) | set(rec["model"].get(dim, {})))
            if not ops:
                continue
            parts = []
            for op in ops:
                got = r0.get(dim, {}).get(op, {})
                want = rec["model"].get(dim, {}).get(op)
                model = f"{want:,}" if want is not None else "(not modelled)"
                parts.append(f"{op} {got.get('bytes', 0):,} / {model} in {got.get('calls', 0)} call(s)")
            lines.append(f"  {dim:9s} ({size} ranks, {where[dim]}): " + "; ".join(parts))
        n = len(rec["ranks"])
        lines.append(f"  all {n} ranks: counted == model" if rec["match"] else
                     "  MISMATCH: " + "; ".join(rec["mismatches"][:6]))
        return "\n".join(lines)

    def on_train_end(self, args, state, control, **kwargs):
        import torch.distributed as dist

        opt = self._opt()
        if opt is None:
            return
        opt.wait_params()
        digest = _sha256_params(self.trainer.accelerator.unwrap_model(self.trainer.model))
        digests = [None] * dist.get_world_size() if dist.is_initialized() else [digest]
        if dist.is_initialized():
            dist.all_gather_object(digests, digest)
        if args.process_index != 0:
            return
        rec = dict(self.record) if self.record is not None else {
            "step": None, "note": f"step {self.target} was not trained in this run: nothing counted"}
        rec["final_step"] = state.global_step
        rec["params_sha256"] = digests
        os.makedirs(args.output_dir, exist_ok=True)
        with open(os.path.join(args.output_dir, COMM_REPORT_FILE), "w") as f:
            json.dump(rec, f, indent=1)


def model_summary(model) -> dict:
    """What was trained: trainable params by name and dtype, and the 4-bit layers (bitsandbytes Linear4bit)."""
    trainable = {n: (list(p.shape), str(p.dtype).replace("torch.", "")) for n, p in model.named_parameters()
                 if p.requires_grad}
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "trainable": trainable,
        "linear4bit_layers": count_linear4bit(model),
        "param_classes": sorted({type(p).__name__ for p in model.parameters()}),
    }


# ---------------------------------------------------------------------------------------------------- report
def param_bytes(p: torch.Tensor) -> int:
    """Bytes of a parameter; a bitsandbytes 4-bit one (packed uint8) with its quantization state (absmax, ...)."""
    n = p.numel() * p.element_size()
    qs = getattr(p, "quant_state", None)
    if qs is not None:
        for t in (getattr(qs, "absmax", None), getattr(getattr(qs, "state2", None), "absmax", None),
                  getattr(qs, "code", None), getattr(getattr(qs, "state2", None), "code", None)):
            if torch.is_tensor(t):
                n += t.numel() * t.element_size()
    return n


_SHORT = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}


def state_by_storage(opt) -> dict[str, dict[str, int]]:
    """ShardedAdamW's state on this rank by moment storage ("fp32", "bf16", "int8", ...; "+kahan" / "+master"
    where the weights keep a compensation / master): trainable elements of the buckets of that kind (whole model,
    not the shard) and the state bytes this rank holds for them."""
    out: dict[str, dict[str, int]] = {}
    for b in opt.engine.buckets:
        kind = b.moments if isinstance(b.moments, str) else _SHORT.get(b.moments, str(b.moments))
        kind += "+kahan" if b.kahan_comp is not None else "+master" if b.master is not None else ""
        d = out.setdefault(kind, {"numel": 0, "bytes": 0})
        d["numel"] += sum(p.numel() for p in b.params)
        d["bytes"] += b.state_bytes()
    return out


def memory_report(trainer, model) -> list[dict]:
    """Per-rank bytes: params, grads (held at the step), optimizer state, peak; and torch AdamW's for comparison."""
    import torch.distributed as dist

    from zeroadamw.integrations.accelerate import find_sharded_optimizer
    from zeroadamw.memory import peak_memory_bytes

    params = [p for p in model.parameters()]
    trainable = [p for p in params if p.requires_grad]
    opt = find_sharded_optimizer(trainer.optimizer)
    inner = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    by_storage = None
    if opt is not None:
        state = opt.state_bytes()
        by_storage = state_by_storage(opt)
        grads = opt.engine.peak_grad_bytes or sum(p.numel() * p.element_size() for p in trainable)
        if opt.stage == 1 and not opt.step_in_backward:
            grads = sum(p.numel() * p.element_size() for p in trainable)
        elif not opt.step_in_backward and trainer.args.gradient_accumulation_steps > 1:
            # stage 2 with accumulation: the micro-batches under no_sync() keep full gradients in param.grad (the
            # hooks skip them, so the engine's counter does not see them) until the last one reduces them
            grads = max(grads, sum(p.numel() * p.element_size() for p in trainable))
    else:
        state = sum(t.numel() * t.element_size() for st in inner.state.values() for k, t in st.items()
                    if torch.is_tensor(t) and k != "step")
        grads = sum(p.numel() * p.element_size() for p in trainable)
    row = {
        "params": sum(param_bytes(p) for p in params),
        "grads": grads,
        "optimizer_state": state,
        "torch_adamw_state": sum(p.numel() for p in trainable) * 8 if trainable and trainable[0].dtype == torch.float32
        else sum(p.numel() for p in trainable) * 12,
        # torch AdamW holds every gradient; with several processes DDP keeps a second copy in its buckets
        "torch_grads": sum(p.numel() * p.element_size() for p in trainable) * (2 if dist.is_initialized() and dist.get_world_size() > 1 else 1),
        "peak": peak_memory_bytes(trainer.args.device) or 0,
    }
    if by_storage is not None:
        row["optimizer_state_by_storage"] = by_storage
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
    by = rows[0].get("optimizer_state_by_storage")
    if by and (len(by) > 1 or next(iter(by)) != "fp32"):
        parts = [f"{k}: {d['numel']:,} elements, {d['bytes']:,} B" for k, d in by.items()]
        print("optimizer state of rank 0 by moment storage: " + "; ".join(parts))


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
    mesh = build_mesh(zargs, targs)  # before the model and the data: a wrong --mesh fails at once

    def say(msg: str) -> None:
        if main_process:
            print(msg, flush=True)

    say(f"building model: {margs.model_name_or_path or os.path.relpath(margs.config_name)}")
    model, tokenizer = build_model(margs, zargs, targs)
    summary = model_summary(model)
    say(f"  {summary['params'] / 1e6:.1f}M params ({summary['trainable_params'] / 1e6:.1f}M trainable)")
    if zargs.qlora:
        dtypes = sorted({d for _, d in summary["trainable"].values()})
        say(f"  4-bit: {summary['linear4bit_layers']} bitsandbytes Linear4bit layers (NF4, compute "
            f"{str(qlora_dtypes(margs.torch_dtype)[1]).replace('torch.', '')}); trainable: "
            f"{len(summary['trainable'])} LoRA tensors ({', '.join(dtypes)})")
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
        if mesh is not None:
            kw["device_mesh"] = mesh
        precision, notes = zeroadamw_precision(zargs, model)
        kw.update(precision)
        for note in notes:
            say(note)
        if zargs.wd_schedule != "none":
            if targs.max_steps <= 0:
                raise ValueError("--wd_schedule needs --max_steps (the steps over which the decay goes to zero)")
            kw.update(wd_schedule=zargs.wd_schedule, wd_schedule_steps=targs.max_steps)
        trainer = keeping_trainable_dtypes(ZeroTrainer, model)(zeroadamw=kw, **common)
    else:
        if zargs.state_dtype is not None or zargs.kahan_sum or zargs.master_dtype != "auto":
            raise SystemExit("--state_dtype / --kahan_sum / --master_dtype are options of --optimizer zeroadamw")
        if zargs.comm_report:
            raise SystemExit("--comm_report counts ShardedAdamW's collectives: an option of --optimizer zeroadamw")
        targs.optim = zargs.optimizer
        trainer = keeping_trainable_dtypes(Trainer, model)(**common)
    comm_cb = None
    if zargs.optimizer == "zeroadamw" and (mesh is not None or zargs.comm_report) \
            and not getattr(trainer, "is_deepspeed_enabled", False):
        comm_cb = CommReport(trainer, step=zargs.comm_report_step)
        trainer.callback_handler.callbacks.insert(0, comm_cb)  # first: its on_step_end reads before others talk
    diag_cb = None
    if zargs.diagnostics:
        from zeroadamw.diagnostics import attach

        diag_cb = attach(trainer)  # to OUTPUT_DIR/diagnostics.jsonl; one summary line per logging step
    from zeroadamw.memory import reset_peak_memory

    reset_peak_memory(targs.device)
    opt_name = (f"ShardedAdamW stage {zargs.stage}" + (", step in backward" if zargs.step_in_backward else "")
                + (f", {zargs.state_dtype} moments" if zargs.state_dtype else "")
                + (", Kahan summation" if zargs.kahan_sum else "")
                if zargs.optimizer == "zeroadamw" else zargs.optimizer)
    if mesh is not None:
        opt_name += f" over a {mesh.size(0)} x {mesh.size(1)} (replicate x shard) mesh"
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
        if comm_cb is not None and os.path.isfile(os.path.join(out, COMM_REPORT_FILE)):
            wrote.append((COMM_REPORT_FILE, "one step's collectives per rank and mesh dimension vs the model"))
        with open(os.path.join(out, "model.json"), "w") as f:
            json.dump(dict(summary, qlora=zargs.qlora, lora=zargs.lora or zargs.qlora), f, indent=1)
        wrote.append(("model.json", "trainable params (name: shape, dtype) and the 4-bit layers"))
        print(f"\nwrote, in {os.path.abspath(out)}/:")
        width = max(len(os.path.join(out, n)) for n, _ in wrote)
        for name, what in wrote:
            print(f"  {os.path.join(out, name):<{width}}  {what}")
    return {"train_loss": result.training_loss, **metrics, "memory": rows}


def shutdown() -> None:
    """End of a launched run: every rank waits for the others, then the process group is destroyed -- a process
    that exits with a live gloo group can abort in its static destructors ("terminate called without an active
    exception", seen once in a dozen 2-process --qlora runs)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
    shutdown()
    # gloo's threads can still abort a finished process in its static destructors ("terminate called without an
    # active exception", seen in CI after shutdown()'s barrier): the run is done and reported, leave without them
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
