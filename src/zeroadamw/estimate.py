r"""``zeroadamw estimate``: per-rank bytes of params / gradients / optimizer state / master weights.

    zeroadamw estimate MODEL --world-size N --dtype {fp32,bf16} [--json]
                       [--state-dtype {fp32,bf16,int8}] [--kahan] [--precision-method METHOD|none]
                       [--bucket-size 8388608] [--lora-rank 8] [--lora-targets q_proj,k_proj,v_proj,o_proj]
                       [--methods ddp_adamw,stage2,...] [--configs-dir DIR]
                       [--nodes K[,K,...] --gpus-per-node G] [--intra-node-gbps 450] [--inter-node-gbps 25]
                       [--reduce-dtype {fp32,bf16}] [--micro-batches 1]

    zeroadamw estimate llama-7b --world-size 8 --methods step_in_backward --state-dtype int8 --kahan
    zeroadamw estimate llama-7b --nodes 4 --gpus-per-node 8                # + the communication table
    zeroadamw estimate llama-7b --nodes 1,2,4,8,16,32,64,128 --gpus-per-node 8   # the sweep table only

``MODEL`` is a Hugging Face ``config.json`` (or the directory holding it), the name of ``configs/<name>.json``,
a built-in preset (:data:`PRESETS`: ``llama-7b``, ``llama-2-7b``, ``llama-2-13b``, ``llama-3-8b``), or a
parameter count (``7e9``, ``7B``, ``1.3B``, ``350M``, ``1300000000``). Configs give the exact per-tensor
breakdown (Llama, Mistral, Qwen2, Qwen3, Mixtral, Qwen2-MoE, in Hugging Face's parameter order), which sets the
bucket layout, the largest gradient and the rows SparseAdamW counts; a bare count is split into synthetic
tensors of one bucket each.

Per rank, :math:`\Psi` trainable params, ``N`` ranks, ``p`` bytes per param element (4 fp32, 2 bf16). ``bf16``
means mixed precision for DeepSpeed and zeroadamw (bf16 params and gradients, fp32 Adam moments and fp32
master) and plain bf16 for torch AdamW (moments in bf16, no master). Buckets are planned exactly as
:class:`~zeroadamw.ShardedAdamW` plans them (one param group, reverse registration order,
:func:`zeroadamw.layout.plan_buckets`); ``S`` = elements this rank owns = :math:`\sum_b \lceil n_b/N \rceil`
(padding included)::

    method                 params    gradients                                          opt. state      master
    ddp_adamw              pΨ        pΨ (+ pΨ DDP bucket copy if N > 1)                 8Ψ (bf16: 4Ψ)   -
    deepspeed_zero1        pΨ        pΨ                                                 8Ψ/N            4Ψ/N
    deepspeed_zero2        pΨ        pΨ/N                                               8Ψ/N            4Ψ/N
    deepspeed_zero3        pΨ/N      pΨ/N                                               8Ψ/N            4Ψ/N
    stage1                 pΨ        pΨ; N > 1: + 4S + in-flight(3)                     8S              4S
    stage2                 pΨ        N = 1: pΨ; else 4S + in-flight(3)                  8S              4S
    step_in_backward       pΨ        N = 1: 2 buckets in fp32; else 3 full buckets      8S              4S
                                     + one reduced fp32 bucket shard
    step_in_backward_clip  pΨ        N = 1: 4Ψ; else as stage2                          8S              4S
    sparse_adamw           pΨ        as stage2                                          8S + 4 x rows   4S
    lora                   p(Ψ+Ψa)   pΨa (+ pΨa DDP copy if N > 1)                      8Ψa (bf16 4Ψa)  -
    lora_stage2            p(Ψ+Ψa)   stage2's, over the adapters                        8Sa             4Sa

Master columns: bf16 only. DeepSpeed's rows are Rajbhandari et al. (2020)'s formulas: K = 12 (moments 8 + master
4) for bf16, K = 8 and no master for fp32. ``in-flight(3)``: the engine keeps two reductions in flight plus the
bucket being filled; a bucket whose reduced shard exists no longer holds its full buffer, so each of 3
neighbouring buckets (in launch order) adds ``p·padded - 4·shard`` over the reduced shard ``4S``; the largest
such window is taken. "N buckets" likewise means the largest window of N neighbouring buckets. The gradient
autograd is producing at a given moment (at most the largest tensor) is transient and not counted, as in the
engine's own counter ``GradEngine.peak_grad_bytes`` that tests/test_estimate.py compares with. Activations are
not estimated. See docs/estimate.md for the measured errors.

Storage of the state (the zeroadamw rows, :data:`ZERO_METHODS`): ``8S`` / ``4S`` above are fp32 moments and the
fp32 master. ``--state-dtype`` (ShardedAdamW's ``state_dtype``) stores the moments in bf16 (``4S``) or int8
(``2S + 8S/256``: a byte per element per moment and an fp32 scale per 256-element block; tensors under
``quant.MIN_QUANTIZED_NUMEL`` = 4096 elements keep fp32 moments in buckets of their own, and int8 buckets start
every tensor on a block and cut shards on blocks, which ``S`` includes). ``--kahan`` (bf16 params only:
``master_dtype=None, kahan_sum=True``) replaces the master by a bf16 compensation: the master column is then
``2S``. Per element, both columns: 12 (fp32 moments + master), 8 (bf16 + master), 6.03 (int8 + master), 10 (fp32
+ Kahan), 6 (bf16 + Kahan), 4.03 (int8 + Kahan); tests/test_estimate.py checks them against
``ShardedAdamW.state_bytes()``. torch AdamW and DeepSpeed rows keep their own storage. Below the table of
methods, one zeroadamw method (``--precision-method``) is shown under each of these six storages. "fits on":
the GPUs of :data:`GPU_SIZES_GB` GB (about as many GiB) whose memory less :data:`GPU_RESERVE_GIB` holds the
total; the activations need the rest.

Communication (``--nodes K --gpus-per-node G``; N = K x G, and ``--world-size``, if given, must agree): the bytes
each rank sends per step on intra-node and on inter-node links, for flat ZeRO over N ranks, hierarchical sharding
(:mod:`zeroadamw.mesh`: shard S = G inside a node, replicate R = K across nodes) and DDP's all-reduce. Per bucket
of ``P`` padded elements (a multiple of S), reduce bytes ``b_r``, param bytes ``b_p`` (:func:`comm_bytes`, to the
byte what :class:`zeroadamw.comm.Comm` counts)::

    "shard" reduce-scatter     (S-1)/S x P x b_r        per reduced backward (--micro-batches)
    "replicate" all-reduce     2(R-1)/R x P/S x b_r     per reduced backward
    "shard" all-gather         (S-1)/S x P x b_p        once per step
    DDP all-reduce             2(N-1)/N x Psi x b_r     per reduced backward

Flat is S = N, R = 1. A flat ring (or DDP's) spanning nodes counts all its bytes on the inter-node links; with
K = 1 all is intra-node. The time lower bound is intra bytes / ``--intra-node-gbps`` + inter bytes /
``--inter-node-gbps`` (GB/s per GPU and direction; defaults :data:`INTRA_NODE_GBPS`, :data:`INTER_NODE_GBPS`):
bandwidth only, no latency, no overlap with compute. A list of K prints :func:`format_comm_sweep` instead of the
memory table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path

from .layout import plan_buckets
from .options import auto_bucket_size
from .quant import BLOCK, MIN_QUANTIZED_NUMEL
from .sharded_adamw import DEFAULT_BUCKET_SIZE
from .storage import STATE_DTYPES

__all__ = [
    "METHODS", "ZERO_METHODS", "PRESETS", "DEFAULT_LORA_TARGETS", "GPU_SIZES_GB", "ModelSpec", "Estimate",
    "parse_count", "load_model", "spec_from_config", "spec_from_module", "estimate", "precision_estimates",
    "precision_label", "default_precision_method", "format_table", "add_arguments", "run",
    "INTRA_NODE_GBPS", "INTER_NODE_GBPS", "CommEstimate", "comm_bytes", "comm_estimate", "comm_sweep", "sweep_rows",
    "format_comm_table", "format_comm_sweep", "topology",
]

DTYPE_BYTES = {"fp32": 4, "bf16": 2}
MOMENT_BYTES = {"fp32": 8, "bf16": 4}  # exp_avg + exp_avg_sq per element; int8: 2 + 8 / BLOCK (codes + scales)
GPU_SIZES_GB = (24, 40, 80)  # the "fits on" column
GPU_RESERVE_GIB = 1.0  # kept free on each card for the CUDA context and the allocator
ACC_BYTES = 4  # zeroadamw's reduced gradient shard: fp32 (the master dtype for bf16, the param dtype for fp32)
MAX_SYNTHETIC_BUCKETS = 2_000_000  # a bare count is split into this many synthetic tensors at most
IN_FLIGHT = 3  # GradEngine.max_inflight (2) reductions in flight + the bucket being filled
DEFAULT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
METHODS = {
    "ddp_adamw": "DDP + torch AdamW",
    "deepspeed_zero1": "DeepSpeed ZeRO-1 (paper)",
    "deepspeed_zero2": "DeepSpeed ZeRO-2 (paper)",
    "deepspeed_zero3": "DeepSpeed ZeRO-3 (paper)",
    "stage1": "zeroadamw stage 1",
    "stage2": "zeroadamw stage 2",
    "step_in_backward": "zeroadamw step in backward",
    "step_in_backward_clip": "zeroadamw step in backward + clip",
    "sparse_adamw": "SparseAdamW (stage 2)",
    "lora": "LoRA r={r} + DDP + torch AdamW",
    "lora_stage2": "LoRA r={r} + zeroadamw stage 2",
}
ZERO_METHODS = ("stage1", "stage2", "step_in_backward", "step_in_backward_clip", "sparse_adamw", "lora_stage2")
"""The rows --state-dtype / --kahan apply to (ShardedAdamW / SparseAdamW); torch AdamW and DeepSpeed keep theirs."""
_LLAMA = dict(model_type="llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
              num_attention_heads=32, num_key_value_heads=32, tie_word_embeddings=False)
PRESETS = {
    "llama-7b": _LLAMA,  # LLaMA-1 7B and Llama-2-7B: 6,738,415,616 params
    "llama-2-7b": _LLAMA,
    "llama-2-13b": dict(_LLAMA, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                        num_attention_heads=40, num_key_value_heads=40),  # 13,015,864,320
    "llama-3-8b": dict(_LLAMA, vocab_size=128256, intermediate_size=14336, num_key_value_heads=8),  # 8,030,261,248
}
"""Built-in model configs (the shapes of the Hugging Face ``config.json``), found by name after ``configs/``."""
_COUNT = re.compile(r"^\s*([0-9][0-9_,]*(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?)\s*([kKmMbBgGtT]?)\s*$")
_SUFFIX = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9, "t": 10**12}


# --------------------------------------------------------------------------------------------------- models
@dataclass
class ModelSpec:
    """A model as the estimator sees it: its trainable tensors in registration order.

    ``sparse`` names the tensors SparseAdamW keeps a per-row step count for (embeddings, MoE experts).
    ``count_only``: built from a bare parameter count; ``tensors`` is empty and the estimator uses synthetic
    tensors of one bucket each.
    """

    name: str
    tensors: list[tuple[str, tuple[int, ...]]]
    sparse: frozenset[str] = frozenset()
    count_only: int | None = None

    @property
    def numel(self) -> int:
        return self.count_only if self.count_only is not None else sum(math.prod(s) for _, s in self.tensors)

    @property
    def largest(self) -> tuple[str, int] | None:
        """(name, elements) of the largest tensor; ``None`` for a bare count."""
        if not self.tensors:
            return None
        name, shape = max(self.tensors, key=lambda t: math.prod(t[1]))
        return name, math.prod(shape)

    @property
    def sparse_rows(self) -> int | None:
        """Rows (elements / last dim) of the sparse tensors; ``None`` for a bare count (unknown)."""
        if self.count_only is not None:
            return None
        return sum(math.prod(s) // s[-1] for n, s in self.tensors if n in self.sparse and s)

    def sizes(self, bucket_size: int) -> list[int]:
        if self.count_only is None:
            return [math.prod(s) for _, s in self.tensors]
        full, rest = divmod(self.count_only, bucket_size)
        if full > MAX_SYNTHETIC_BUCKETS:
            raise ValueError(f"bucket size {bucket_size:,} splits {self.count_only:,} params into more than "
                             f"{MAX_SYNTHETIC_BUCKETS:,} buckets; use a larger --bucket-size (default {DEFAULT_BUCKET_SIZE})")
        return [bucket_size] * full + ([rest] if rest else [])


def parse_count(text: str) -> int | None:
    """``"7e9"``, ``"7B"``, ``"1.3B"``, ``"350M"``, ``"1_300_000_000"`` -> an int; ``None`` if ``text`` does not
    look like a number; ``ValueError`` if it does but is not a positive whole number of parameters."""
    m = _COUNT.match(text)
    if m is None:
        return None
    try:
        value = Decimal(m.group(1).replace("_", "").replace(",", "")) * _SUFFIX[m.group(2).lower()]
    except InvalidOperation:
        return None
    if value != value.to_integral_value() or value < 1:
        raise ValueError(f"bad parameter count {text!r}: give a positive whole number of parameters, "
                         "e.g. 7e9, 7B, 1.3B, 350M or 1300000000")
    return int(value)


def _need(cfg: dict, key: str, where: str) -> int:
    v = cfg.get(key)
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        raise ValueError(f"{where}: config key {key!r} is missing or not a non-negative int (got {v!r}); "
                         "pass a complete Hugging Face config.json, or the parameter count instead (e.g. 7e9)")
    return v


def _linear(name: str, n_in: int, n_out: int, bias: bool) -> list[tuple[str, tuple[int, ...]]]:
    return [(f"{name}.weight", (n_out, n_in))] + ([(f"{name}.bias", (n_out,))] if bias else [])


SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "mixtral", "qwen2_moe")


def spec_from_config(cfg: dict, name: str = "config") -> ModelSpec:
    """The trainable tensors of a Hugging Face causal LM config (a dict, as in ``config.json``), in the order
    ``model.named_parameters()`` lists them (transformers 5: MoE experts fused into 3-D tensors)."""
    if not isinstance(cfg, dict):
        raise ValueError(f"{name}: a config must be a JSON object, got {type(cfg).__name__}")
    if not _is_model_config(cfg):
        raise ValueError(f"{name} is not a model config (no model_type or hidden_size; a DeepSpeed / accelerate "
                         "config?); pass a Hugging Face config.json, or the parameter count (e.g. 7e9)")
    mt = cfg.get("model_type", "llama")
    if mt not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"{name}: model_type {mt!r} is not supported (supported: {', '.join(SUPPORTED_MODEL_TYPES)}); "
                         "pass the parameter count instead, e.g. `zeroadamw estimate 7e9`")
    V, h, L = _need(cfg, "vocab_size", name), _need(cfg, "hidden_size", name), _need(cfg, "num_hidden_layers", name)
    H = _need(cfg, "num_attention_heads", name)
    if H == 0 or h == 0:
        raise ValueError(f"{name}: hidden_size and num_attention_heads must be positive")
    kv = cfg.get("num_key_value_heads") or H
    hd = cfg.get("head_dim") or (128 if mt == "qwen3" else h // H)
    qkv_bias = {"qwen2": True, "qwen2_moe": cfg.get("qkv_bias", True)}.get(mt, bool(cfg.get("attention_bias", False)))
    o_bias = mt in ("llama", "qwen3") and bool(cfg.get("attention_bias", False))
    mlp_bias = mt == "llama" and bool(cfg.get("mlp_bias", False))
    t: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (V, h))]
    sparse = {"model.embed_tokens.weight"}
    for i in range(L):
        a, m = f"model.layers.{i}.self_attn", f"model.layers.{i}.mlp"
        t += _linear(f"{a}.q_proj", h, H * hd, qkv_bias) + _linear(f"{a}.k_proj", h, kv * hd, qkv_bias)
        t += _linear(f"{a}.v_proj", h, kv * hd, qkv_bias) + _linear(f"{a}.o_proj", H * hd, h, o_bias)
        if mt == "qwen3":
            t += [(f"{a}.q_norm.weight", (hd,)), (f"{a}.k_norm.weight", (hd,))]
        moe = False
        if mt == "mixtral":
            E, I = _need(cfg, "num_local_experts", name), _need(cfg, "intermediate_size", name)
            moe = True
        elif mt == "qwen2_moe":
            E, I = _need(cfg, "num_experts", name), _need(cfg, "moe_intermediate_size", name)
            step = cfg.get("decoder_sparse_step", 1) or 1
            moe = i not in (cfg.get("mlp_only_layers") or []) and E > 0 and (i + 1) % step == 0
        if moe:
            t += [(f"{m}.gate.weight", (E, h)), (f"{m}.experts.gate_up_proj", (E, 2 * I, h)),
                  (f"{m}.experts.down_proj", (E, h, I))]
            sparse |= {f"{m}.experts.gate_up_proj", f"{m}.experts.down_proj"}
            if mt == "qwen2_moe":
                S = _need(cfg, "shared_expert_intermediate_size", name)
                t += _linear(f"{m}.shared_expert.gate_proj", h, S, False) + _linear(f"{m}.shared_expert.up_proj", h, S, False)
                t += _linear(f"{m}.shared_expert.down_proj", S, h, False) + [(f"{m}.shared_expert_gate.weight", (1, h))]
        else:
            I = _need(cfg, "intermediate_size", name)
            t += _linear(f"{m}.gate_proj", h, I, mlp_bias) + _linear(f"{m}.up_proj", h, I, mlp_bias)
            t += _linear(f"{m}.down_proj", I, h, mlp_bias)
        t += [(f"model.layers.{i}.input_layernorm.weight", (h,)), (f"model.layers.{i}.post_attention_layernorm.weight", (h,))]
    t.append(("model.norm.weight", (h,)))
    if not cfg.get("tie_word_embeddings", False):
        t.append(("lm_head.weight", (V, h)))
    return ModelSpec(name, t, frozenset(sparse))


def spec_from_module(module, name: str | None = None) -> ModelSpec:
    """The trainable parameters of a built ``torch.nn.Module`` (e.g. to check the estimate against a
    measurement); embeddings and params under an ``experts`` module count as sparse."""
    from torch import nn

    sparse = set()
    for mname, mod in module.named_modules():
        if isinstance(mod, (nn.Embedding, nn.EmbeddingBag)):
            sparse.add(f"{mname}.weight" if mname else "weight")
    tensors = [(n, tuple(p.shape)) for n, p in module.named_parameters() if p.requires_grad and p.numel()]
    sparse |= {n for n, s in tensors if ".experts." in f".{n}" and len(s) >= 2}
    return ModelSpec(name or type(module).__name__, tensors, frozenset(n for n, _ in tensors if n in sparse))


def _config_dirs(configs_dir: str | None) -> list[Path]:
    if configs_dir is not None:
        return [Path(configs_dir)]
    here = Path(__file__).resolve().parents[2] / "configs"  # the repository's configs/ (src layout)
    return list(dict.fromkeys([Path.cwd() / "configs", here]))


def _is_model_config(cfg) -> bool:
    return isinstance(cfg, dict) and any(k in cfg for k in ("model_type", "hidden_size", "num_parameters"))


def _named_configs(dirs: list[Path]) -> list[str]:
    """Names of the model configs (not DeepSpeed / accelerate configs) in ``dirs``."""
    names = set()
    for d in dirs:
        for path in sorted(d.glob("*.json")) if d.is_dir() else ():
            try:
                if _is_model_config(_read_config(path)):
                    names.add(path.stem)
            except ValueError:
                continue
    return sorted(names)


def _read_config(path: Path) -> dict:
    try:
        with open(path) as f:
            cfg = json.load(f)
    except OSError as e:
        raise ValueError(f"cannot read config {str(path)!r}: {e.strerror or e}; check the path") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"config {str(path)!r} is not valid JSON ({e}); pass a Hugging Face config.json") from None
    if isinstance(cfg, dict):
        for key in ("model_config", "model"):  # a recipe wrapping the model's config
            if isinstance(cfg.get(key), dict) and "model_type" not in cfg and "hidden_size" not in cfg:
                return cfg[key]
    return cfg


def _spec_from_json(cfg, name: str) -> ModelSpec:
    """A Hugging Face config, or ``{"num_parameters": N}`` (a recipe that only knows the size)."""
    if isinstance(cfg, dict) and "num_parameters" in cfg and "hidden_size" not in cfg:
        n = parse_count(str(cfg["num_parameters"]))
        if n is None:
            raise ValueError(f"{name}: num_parameters {cfg['num_parameters']!r} is not a parameter count (e.g. 7e9)")
        return ModelSpec(name, [], count_only=n)
    return spec_from_config(cfg, name=name)


def load_model(text: str, configs_dir: str | None = None) -> ModelSpec:
    """``MODEL`` of the command line -> :class:`ModelSpec`: a parameter count, a config path (file or directory
    with ``config.json``), or a name looked up as ``<configs dir>/<name>.json`` (``./configs`` and the
    repository's ``configs/`` unless ``configs_dir`` is given), then in :data:`PRESETS` (``llama-7b``, ...)."""
    n = parse_count(text)
    if n is not None:
        return ModelSpec(text.strip(), [], count_only=n)
    path = Path(text).expanduser()
    if path.is_dir():
        path = path / "config.json"
        if not path.is_file():
            raise ValueError(f"directory {text!r} has no config.json; pass the config file itself")
    if path.exists() or path.suffix == ".json" or os.sep in text:
        if not path.is_file():
            raise ValueError(f"config file {text!r} does not exist; pass an existing config.json path, a name "
                             "from configs/, or a parameter count like 7e9")
        return _spec_from_json(_read_config(path), str(text))
    dirs = _config_dirs(configs_dir)
    for d in dirs:
        candidate = d / f"{text}.json"
        if candidate.is_file():
            return _spec_from_json(_read_config(candidate), text)
    if text.lower() in PRESETS:
        return spec_from_config(PRESETS[text.lower()], name=text)
    known = _named_configs(dirs)
    raise ValueError(
        f"unknown model {text!r}: not a parameter count, not a file, and no {text}.json in "
        f"{', '.join(str(d) for d in dirs)}. Named configs available: {', '.join(known) if known else 'none'}. "
        f"Built-in presets: {', '.join(PRESETS)}. "
        "Pass a Hugging Face config.json path, a name from those lists, or a count like 7e9 / 7B / 1300000000")


# ------------------------------------------------------------------------------------------------- estimate
@dataclass
class Estimate:
    """Per-rank bytes of one method. ``master``: the fp32 master weights, or with ``kahan`` the bf16 Kahan
    compensation that replaces them; ``state_dtype``: how the Adam moments are stored (``"bf16"`` for torch
    AdamW on bf16 params)."""

    method: str
    label: str
    params: int
    grads: int
    optimizer_state: int
    master: int
    trainable: int
    notes: list[str] = field(default_factory=list)
    state_dtype: str = "fp32"
    kahan: bool = False

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer_state + self.master

    def fits_on(self) -> list[int]:
        """The sizes of :data:`GPU_SIZES_GB` this total fits on, :data:`GPU_RESERVE_GIB` kept free on each."""
        return [g for g in GPU_SIZES_GB if self.total <= (g - GPU_RESERVE_GIB) * 2**30]

    def record(self) -> dict:
        return {"method": self.method, "label": self.label, "trainable_params": self.trainable,
                "state_dtype": self.state_dtype, "kahan": self.kahan,
                "bytes_per_rank": {"params": self.params, "grads": self.grads,
                                   "optimizer_state": self.optimizer_state, "master": self.master,
                                   "total": self.total},
                "fits_on_gb": self.fits_on(),
                "headroom_gib": {str(g): round(g - GPU_RESERVE_GIB - self.total / 2**30, 3) for g in GPU_SIZES_GB},
                "notes": list(self.notes)}


def _moments_of(numel: int, state_dtype: str) -> str:
    """How ShardedAdamW stores one tensor's moments: int8 only from ``quant.MIN_QUANTIZED_NUMEL`` elements on."""
    return "fp32" if state_dtype == "int8" and numel < MIN_QUANTIZED_NUMEL else state_dtype


class _Buckets:
    """The buckets ShardedAdamW would build for tensors of ``sizes`` (one group, one dtype): element counts (int8
    buckets start each tensor on a 256-element block: the gaps are included), how each stores its moments, and
    the shard alignment (int8 buckets cut shards on blocks). As :func:`zeroadamw.buckets.dense_buckets`: int8
    buckets for the tensors of at least ``MIN_QUANTIZED_NUMEL`` elements, fp32-moment buckets for the rest."""

    def __init__(self, sizes: list[int], bucket_size: int, state_dtype: str = "fp32") -> None:
        kinds: dict[str, list[int]] = {}  # one list per kind, in first-seen order
        for s in sizes[::-1]:  # reverse registration order ~ backward order, as ShardedAdamW packs them
            kinds.setdefault(_moments_of(s, state_dtype), []).append(s)
        self.numels: list[int] = []
        self.aligns: list[int] = []
        self.kinds: list[str] = []
        for kind, ss in kinds.items():
            align = BLOCK if kind == "int8" else 1
            for idx in plan_buckets(ss, bucket_size):
                end = 0
                for i in idx:
                    end = -(-end // align) * align + ss[i]
                self.numels.append(end)
                self.aligns.append(align)
                self.kinds.append(kind)

    def shards(self, n: int) -> list[int]:
        """Each bucket's shard, the elements every rank owns (padding included), as ``BucketLayout.shard``."""
        return [-(-b // (n * a)) * a for b, a in zip(self.numels, self.aligns)]

    def owned(self, n: int) -> int:
        """Elements this rank owns over all buckets (with padding): S."""
        return sum(self.shards(n))

    def state(self, n: int, weight_bytes: int) -> tuple[int, int]:
        """Per rank, what ``Bucket.state_bytes`` sums: (both moments -- fp32 8, bf16 4, int8 1 + 1 byte and a
        4-byte scale per 256 elements each; the master or Kahan compensation, ``weight_bytes`` per element)."""
        moments = 0
        for s, kind in zip(self.shards(n), self.kinds):
            moments += 2 * s + 2 * 4 * (s // BLOCK) if kind == "int8" else MOMENT_BYTES[kind] * s
        return moments, weight_bytes * self.owned(n)

    @staticmethod
    def _window(values: list[int], k: int) -> int:
        """The largest sum of ``k`` consecutive values (buckets in flight are neighbours in launch order)."""
        run = best = sum(values[:k])
        for i in range(k, len(values)):
            run += values[i] - values[i - k]
            best = max(best, run)
        return best

    def in_flight(self, n: int, p: int, k: int = IN_FLIGHT) -> int:
        """``k`` neighbouring buckets still full-size: ``p·padded - 4·shard`` each over the reduced shard."""
        return self._window([max(0, (p * n - ACC_BYTES) * s) for s in self.shards(n)], k)

    def full(self, n: int, p: int, k: int) -> int:
        """``k`` neighbouring full-size (padded) buckets of ``p`` bytes per element."""
        return self._window([p * s * n for s in self.shards(n)], k)


def _lora_tensors(spec: ModelSpec, rank: int, targets) -> list[tuple[str, tuple[int, ...]]]:
    """lora_A [r, in] and lora_B [out, r] for every 2-D weight named ``*.<target>.weight``."""
    out = []
    for name, shape in spec.tensors:
        parts = name.split(".")
        if len(shape) == 2 and len(parts) >= 2 and parts[-1] == "weight" and parts[-2] in targets:
            base = ".".join(parts[:-1])
            out += [(f"{base}.lora_A.weight", (rank, shape[1])), (f"{base}.lora_B.weight", (shape[0], rank))]
    return out


def _sharded_grads(b: _Buckets, n: int, p: int, psi: int) -> int:
    """Stage 2's gradient memory: param.grad in one process; else the fp32 reduced shard + 3 buckets."""
    return p * psi if n == 1 else ACC_BYTES * b.owned(n) + b.in_flight(n, p)


def precision_label(state_dtype: str, kahan: bool, dtype: str = "bf16") -> str:
    """``"int8 moments + Kahan (no master)"``, ``"fp32 moments + fp32 master"``, ...: one row of the precision
    table."""
    weights = " + Kahan (no master)" if kahan else " + fp32 master" if dtype == "bf16" else ""
    return f"{state_dtype} moments{weights}"


@dataclass
class _Setup:
    """The checked arguments of :func:`estimate` and what every row derives from them."""

    spec: ModelSpec
    n: int
    dtype: str
    state_dtype: str
    kahan: bool
    bucket_size: int
    explicit_bucket: bool
    lora_rank: int
    lora_targets: tuple
    sizes: list[int] = field(default_factory=list)

    @property
    def p(self) -> int:
        return DTYPE_BYTES[self.dtype]

    @property
    def mixed(self) -> bool:
        return self.dtype == "bf16"

    @property
    def weight_bytes(self) -> int:
        """Per owned element: the bf16 Kahan compensation (2), the fp32 master of bf16 params (4), or none."""
        return self.p if self.kahan else ACC_BYTES if self.mixed else 0

    @property
    def psi(self) -> int:
        return sum(self.sizes)

    def buckets(self, sizes: list[int] | None = None) -> _Buckets:
        if sizes is None:
            return _Buckets(self.sizes, self.bucket_size, self.state_dtype)
        bucket = self.bucket_size if self.explicit_bucket else auto_bucket_size(sum(sizes))
        return _Buckets(sizes, bucket, self.state_dtype)

    def precision_notes(self, sizes: list[int]) -> list[str]:
        """What the zeroadamw rows' optimizer state / master columns hold under --state-dtype / --kahan."""
        notes = []
        if self.state_dtype == "int8":
            small = [s for s in sizes if s < MIN_QUANTIZED_NUMEL]
            notes.append(f"int8 moments: 1 B per element per moment + a 4-byte scale per {BLOCK} elements (2.03 B "
                         f"for both); tensors under {MIN_QUANTIZED_NUMEL:,} elements keep fp32 moments (8 B): "
                         + (f"here {len(small):,} tensors, {sum(small):,} elements" if small else "none here")
                         + f"; int8 buckets start every tensor on a {BLOCK}-element block (padding counted)")
            if self.spec.count_only is not None:
                notes.append("bare count: every synthetic tensor is int8; a real model's norms and biases stay "
                             "fp32 (pass a config)")
        elif self.state_dtype == "bf16":
            notes.append("bf16 moments: 4 B per element for both (the update math runs in fp32)")
        if self.kahan:
            notes.append("Kahan (master_dtype=None, kahan_sum=True): no fp32 master; the master column holds the "
                         "bf16 compensation, 2 B per element, sharded like the moments")
        return notes


def _setup(spec: ModelSpec, world_size, dtype, bucket_size, lora_rank, lora_targets, state_dtype, kahan) -> _Setup:
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world size must be an int >= 1 (the number of data-parallel ranks), got {world_size!r}")
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPE_BYTES)}, got {dtype!r}")
    if state_dtype not in STATE_DTYPES:
        raise ValueError(f"state dtype must be one of {', '.join(STATE_DTYPES)} (--state-dtype), got {state_dtype!r}")
    if not isinstance(kahan, bool):
        raise TypeError(f"kahan must be True or False, got {kahan!r}")
    if kahan and dtype != "bf16":
        raise ValueError("--kahan replaces the fp32 master of bf16 params by a bf16 compensation; fp32 params have "
                         "no master to replace: use --dtype bf16, or drop --kahan")
    explicit_bucket = bucket_size is not None
    if bucket_size is None:  # ShardedAdamW's default: from the model's size
        bucket_size = auto_bucket_size(spec.numel)
    if isinstance(bucket_size, bool) or not isinstance(bucket_size, int) or bucket_size < 1:
        raise ValueError(f"bucket size must be a positive number of elements, got {bucket_size!r}")
    if isinstance(lora_rank, bool) or not isinstance(lora_rank, int) or lora_rank < 1:
        raise ValueError(f"LoRA rank must be an int >= 1, got {lora_rank!r}")
    s = _Setup(spec, world_size, dtype, state_dtype, kahan, bucket_size, explicit_bucket, lora_rank,
               tuple(lora_targets))
    s.sizes = spec.sizes(bucket_size)
    return s


_DDP_NOTE = "grads include DDP's bucket copy of every gradient (gradient_as_bucket_view=False, the default)"


def _torch_rows(m: str, s: _Setup, label: str) -> Estimate:
    """DDP + torch AdamW and DeepSpeed's paper formulas (``--state-dtype`` / ``--kahan`` do not apply)."""
    n, p, psi, mixed = s.n, s.p, s.psi, s.mixed
    notes: list[str] = []
    if m == "ddp_adamw":
        notes.append(_DDP_NOTE if n > 1 else "one process: no DDP, param.grad only")
        if mixed:
            notes.append("bf16 params: torch AdamW keeps exp_avg/exp_avg_sq in bf16, no fp32 master")
        return Estimate(m, label, p * psi, p * psi * (2 if n > 1 else 1), (4 if mixed else 8) * psi, 0, psi, notes,
                        state_dtype=s.dtype)
    st = int(m[-1])
    ds = lambda k: -(-k * psi // n)  # noqa: E731 - the paper's per-rank share, rounded up
    notes.append("Rajbhandari et al. 2020: K = 12 (fp32 master + m + v) for bf16, K = 8 for fp32; DeepSpeed's own "
                 "communication buckets (reduce/allgather_bucket_size) not included")
    return Estimate(m, label, ds(p) if st == 3 else p * psi, ds(p) if st >= 2 else p * psi, ds(8),
                    ds(4) if mixed else 0, psi, notes)


def _zero_row(m: str, s: _Setup, label: str) -> Estimate:
    """zeroadamw stage 1 / stage 2 / step in backward (+ clip) / SparseAdamW."""
    n, p, psi, spec = s.n, s.p, s.psi, s.spec
    b = s.buckets()
    S = b.owned(n)
    state, master = b.state(n, s.weight_bytes)
    notes: list[str] = []
    if m == "stage1":
        grads = p * psi + (ACC_BYTES * S + b.in_flight(n, p) if n > 1 else 0)
        if n > 1:
            notes.append("param.grad (full) + at step() the fp32 reduced shard and up to 3 buckets in flight")
    elif m == "step_in_backward_clip" and n == 1:
        grads = ACC_BYTES * psi
        notes.append("one process: every gradient held in fp32 until step() (exact clipping)")
    elif m == "step_in_backward":
        if n == 1:
            grads = b.full(1, ACC_BYTES, 2)
            notes.append("one process: gradients of at most 2 neighbouring buckets, in fp32, until they are applied")
        else:
            grads = b.full(n, p, IN_FLIGHT) + ACC_BYTES * max(b.shards(n), default=0)
            notes.append("up to 3 full-size buckets in flight + one reduced shard being applied; no 1/N shard kept")
        if spec.count_only is not None:
            notes.append("bare count: assumes no tensor exceeds the bucket size (a large embedding does: pass a "
                         "config)")
    else:
        grads = _sharded_grads(b, n, p, psi)
        notes.append("one process: param.grad, no buckets" if n == 1 else
                     "fp32 reduced 1/N shard + up to 3 neighbouring full-size buckets in flight")
    if m == "sparse_adamw":
        rows = spec.sparse_rows
        if rows is None:
            notes.append("per-row step counts not included: a bare parameter count has no rows (pass a config)")
        else:
            state += 4 * rows
            notes.append(f"+ 4 B per row (elements / last dim) of embeddings / experts ({rows:,} rows) on every rank, "
                         "an approximation: SparseAdamW keeps a float32 step count and a float64 decay mark (12 B) "
                         "per dim-0 slice it owns -- an embedding row or a whole expert -- about slices / N of them "
                         "per rank")
    notes += s.precision_notes(s.sizes)
    return Estimate(m, label, p * psi, grads, state, master, psi, notes, s.state_dtype, s.kahan)


def _lora_row(m: str, s: _Setup, label: str) -> Estimate:
    """LoRA rank r on ``lora_targets``: DDP + torch AdamW, or zeroadamw stage 2 over the adapters."""
    n, p, psi, spec = s.n, s.p, s.psi, s.spec
    adapters = _lora_tensors(spec, s.lora_rank, s.lora_targets)
    if not adapters:
        cands = sorted({nm.split(".")[-2] for nm, sh in spec.tensors if len(sh) == 2 and nm.endswith(".weight")})
        raise ValueError(f"LoRA targets {','.join(s.lora_targets)} match no 2-D weight of {spec.name}; pass "
                         f"--lora-targets from: {', '.join(cands) if cands else '(none: pass a config)'}")
    a_sizes = [math.prod(sh) for _, sh in adapters]
    psi_a = sum(a_sizes)
    params = p * (psi + psi_a)
    notes = [f"rank {s.lora_rank} adapters on {','.join(s.lora_targets)}: {psi_a:,} trainable; the frozen base costs "
             "only its params"]
    if m == "lora":
        notes.append(_DDP_NOTE if n > 1 else "one process: no DDP")
        return Estimate(m, label, params, p * psi_a * (2 if n > 1 else 1), (4 if s.mixed else 8) * psi_a, 0, psi_a,
                        notes, state_dtype=s.dtype)
    ba = s.buckets(a_sizes)
    state, master = ba.state(n, s.weight_bytes)
    notes += s.precision_notes(a_sizes)
    return Estimate(m, label, params, _sharded_grads(ba, n, p, psi_a), state, master, psi_a, notes, s.state_dtype,
                    s.kahan)


def estimate(spec: ModelSpec, world_size: int, dtype: str = "bf16", *, bucket_size: int | None = None,
             lora_rank: int = 8, lora_targets=DEFAULT_LORA_TARGETS, methods=None, state_dtype: str = "fp32",
             kahan: bool = False) -> list[Estimate]:
    """Per-rank bytes for each of ``methods`` (default: all of :data:`METHODS`; LoRA is left out for a bare
    parameter count, which has no layer shapes). ``state_dtype`` (``"fp32"``, ``"bf16"``, ``"int8"``) and
    ``kahan`` (bf16 only: ``master_dtype=None, kahan_sum=True``) are ShardedAdamW's options, for the zeroadamw
    rows (:data:`ZERO_METHODS`); their labels then say so."""
    s = _setup(spec, world_size, dtype, bucket_size, lora_rank, lora_targets, state_dtype, kahan)
    explicit = methods is not None
    methods = list(METHODS) if methods is None else list(methods)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    if spec.count_only is not None and not explicit:
        methods = [m for m in methods if not m.startswith("lora")]
    tag = " + ".join(([f"{state_dtype} moments"] if state_dtype != "fp32" else []) + (["Kahan"] if kahan else []))
    out = []
    for m in methods:
        label = METHODS[m].format(r=lora_rank) + (f" [{tag}]" if tag and m in ZERO_METHODS else "")
        if m == "ddp_adamw" or m.startswith("deepspeed_zero"):
            out.append(_torch_rows(m, s, label))
        elif m.startswith("lora"):
            out.append(_lora_row(m, s, label))
        else:
            out.append(_zero_row(m, s, label))
    return out


def precision_estimates(spec: ModelSpec, world_size: int, dtype: str = "bf16", method: str = "step_in_backward",
                        **kw) -> list[Estimate]:
    """``method`` (one of :data:`ZERO_METHODS`) under every storage of the state, side by side: fp32 / bf16 /
    int8 moments, each with the fp32 master and with Kahan (bf16 params; fp32 params have no master).
    ``kw``: :func:`estimate`'s bucket_size, lora_rank, lora_targets."""
    if method not in ZERO_METHODS:
        raise ValueError(f"the precision table is for zeroadamw's methods ({', '.join(ZERO_METHODS)}), got "
                         f"{method!r}; pass --precision-method with one of them, or none")
    out = []
    for kahan in ((False, True) if dtype == "bf16" else (False,)):
        for sd in STATE_DTYPES:
            e = estimate(spec, world_size, dtype, methods=[method], state_dtype=sd, kahan=kahan, **kw)[0]
            e.label = precision_label(sd, kahan, dtype)
            out.append(e)
    return out


def default_precision_method(methods) -> str | None:
    """The method the precision table shows: step in backward when selected, else the first zeroadamw one."""
    methods = list(METHODS) if methods is None else list(methods)
    if "step_in_backward" in methods:
        return "step_in_backward"
    return next((m for m in methods if m in ZERO_METHODS), None)


# ------------------------------------------------------------------------------------------- communication
INTRA_NODE_GBPS = 450.0
"""GB/s per GPU, one direction, inside a node (``--intra-node-gbps``): H100 SXM's NVLink 4, 900 GB/s both ways."""
INTER_NODE_GBPS = 25.0
"""GB/s per GPU, one direction, between nodes (``--inter-node-gbps``): one 200 Gb/s InfiniBand NIC per GPU."""
COMM_LAYOUTS = {
    "flat": "flat ZeRO, {n}",
    "hierarchical": "hierarchical, {g} shard x {k} replicate",
    "ddp": "DDP all-reduce, {n}",
}


def _positive_int(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{what} must be an int >= 1, got {value!r}")
    return value


def comm_bytes(buckets, shard: int, replicate: int = 1, micro_batches: int = 1) -> dict[str, dict[str, int]]:
    """Bytes one rank sends per optimizer step, as :class:`zeroadamw.comm.Comm`'s counters count them.

    ``buckets``: ``(padded_numel, reduce_bytes, param_bytes)`` per gradient bucket; ``padded_numel`` is a multiple
    of ``shard`` (ShardedAdamW pads every bucket so). ``shard`` = S ranks of the ``"shard"`` dimension, ``replicate``
    = R of ``"replicate"`` (flat sharding over N ranks: ``shard=N, replicate=1``). Per bucket, each collective
    call is rounded with ``int(round(...))`` as the counter rounds it, from the same float expression:

    * ``"shard"`` reduce-scatter: ``(S-1)/S * P * reduce_bytes``, once per reduced backward (``micro_batches``);
    * ``"replicate"`` all-reduce of the 1/S shard: ``2(R-1)/R * P/S * reduce_bytes``, once per reduced backward;
    * ``"shard"`` all-gather of the updated params: ``(S-1)/S * P * param_bytes``, once per step.

    Returns ``{"shard": {"reduce_scatter": int, "all_gather": int}, "replicate": {"all_reduce": int}}``; a
    dimension of size 1 makes no collective call, and its dict is empty."""
    shard = _positive_int(shard, "shard (the shard group's size S)")
    replicate = _positive_int(replicate, "replicate (the replicate group's size R)")
    micro_batches = _positive_int(micro_batches, "micro_batches (reduced backward passes per step)")
    rs = ag = ar = 0
    for padded, reduce_bytes, param_bytes in buckets:
        if padded % shard:
            raise ValueError(f"bucket of {padded} padded elements is not a multiple of the shard size {shard}: "
                             "ShardedAdamW pads each bucket to a multiple of the shard group's size")
        if shard > 1:
            rs += int(round((shard - 1) / shard * padded * reduce_bytes))  # Comm.reduce_scatter's expression
            ag += int(round((shard - 1) / shard * padded * param_bytes))  # Comm.all_gather's
        if replicate > 1:
            ar += int(round(2 * (replicate - 1) / replicate * (padded // shard) * reduce_bytes))  # Comm.all_reduce's
    return {"shard": {"reduce_scatter": micro_batches * rs, "all_gather": ag} if shard > 1 else {},
            "replicate": {"all_reduce": micro_batches * ar} if replicate > 1 else {}}


@dataclass
class CommEstimate:
    """One layout's per-step communication per rank (``layout``: ``"flat"``, ``"hierarchical"``, ``"ddp"``).

    ``shard`` / ``replicate``: the sizes of the two dimensions (DDP: ``shard=1``, all ranks replicate);
    ``collectives``: :func:`comm_bytes`'s dict (DDP: ``{"world": {"all_reduce": bytes}}``); ``intra_node`` /
    ``inter_node``: those bytes by the links they cross; ``state``: optimizer state + master (or Kahan
    compensation) per rank, sharded over ``shard`` (DDP: torch AdamW's, replicated)."""

    layout: str
    label: str
    nodes: int
    gpus_per_node: int
    shard: int
    replicate: int
    collectives: dict
    intra_node: int
    inter_node: int
    state: int
    intra_node_gbps: float = INTRA_NODE_GBPS
    inter_node_gbps: float = INTER_NODE_GBPS
    micro_batches: int = 1

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def intra_s(self) -> float:
        return self.intra_node / (self.intra_node_gbps * 1e9)

    @property
    def inter_s(self) -> float:
        return self.inter_node / (self.inter_node_gbps * 1e9)

    @property
    def time_s(self) -> float:
        """The step's communication time lower bound: bandwidth only, the intra- and inter-node phases one after
        the other; no latency, no overlap with compute."""
        return self.intra_s + self.inter_s

    @property
    def overlapped_s(self) -> float:
        """The same if the intra- and inter-node phases of different buckets overlapped perfectly."""
        return max(self.intra_s, self.inter_s)

    def record(self) -> dict:
        return {"layout": self.layout, "label": self.label, "nodes": self.nodes, "gpus_per_node": self.gpus_per_node,
                "world_size": self.world_size, "shard_size": self.shard, "replicate_size": self.replicate,
                "micro_batches": self.micro_batches, "collectives": self.collectives,
                "bytes_per_rank": {"intra_node": self.intra_node, "inter_node": self.inter_node,
                                   "total": self.intra_node + self.inter_node},
                "bandwidth_gbps": {"intra_node": self.intra_node_gbps, "inter_node": self.inter_node_gbps},
                "time_lower_bound_s": self.time_s, "time_overlapped_s": self.overlapped_s,
                "state_bytes_per_rank": self.state}


def _plural(n: int, what: str) -> str:
    return f"{n} {what}{'s' if n != 1 else ''}"


def _gbps(value, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise ValueError(f"{what} must be a positive number of GB/s per GPU, got {value!r}")
    return float(value)


def comm_estimate(spec: ModelSpec, nodes: int, gpus_per_node: int, dtype: str = "bf16", *,
                  reduce_dtype: str | None = None, bucket_size: int | None = None, state_dtype: str = "fp32",
                  kahan: bool = False, micro_batches: int = 1, intra_node_gbps: float = INTRA_NODE_GBPS,
                  inter_node_gbps: float = INTER_NODE_GBPS) -> list[CommEstimate]:
    """Per-step bytes per rank on intra- and inter-node links, K = ``nodes`` x G = ``gpus_per_node`` ranks, for
    flat ZeRO over N = K x G ranks, hierarchical sharding (shard S = G inside a node, replicate R = K across
    nodes) and DDP's all-reduce. Buckets as ShardedAdamW plans them (``bucket_size``, ``state_dtype``: int8 cuts
    shards on blocks), padded per shard size. ``reduce_dtype`` (default ``dtype``): the gradients' dtype on the
    wire; ``micro_batches``: backward passes reduced per step (stage 2 outside ``no_sync()``, step in backward).
    A flat ring spanning nodes (K > 1) counts all its bytes on the inter-node links: its slowest hop sets its
    speed (NCCL's bus bandwidth); with K = 1 all is intra-node. See docs/estimate.md."""
    nodes = _positive_int(nodes, "nodes (--nodes)")
    gpus = _positive_int(gpus_per_node, "GPUs per node (--gpus-per-node)")
    micro_batches = _positive_int(micro_batches, "micro-batches (--micro-batches)")
    bws = (_gbps(intra_node_gbps, "intra-node bandwidth (--intra-node-gbps)"),
           _gbps(inter_node_gbps, "inter-node bandwidth (--inter-node-gbps)"))
    reduce_dtype = dtype if reduce_dtype is None else reduce_dtype
    if reduce_dtype not in DTYPE_BYTES:
        raise ValueError(f"reduce dtype must be one of {', '.join(DTYPE_BYTES)} (--reduce-dtype), got {reduce_dtype!r}")
    n = nodes * gpus
    ranks = _plural(n, "rank")
    s = _setup(spec, n, dtype, bucket_size, 8, DEFAULT_LORA_TARGETS, state_dtype, kahan)
    b, br, bp = s.buckets(), DTYPE_BYTES[reduce_dtype], s.p

    def zero(layout: str, shard: int, replicate: int) -> CommEstimate:
        planned = [(sh * shard, br, bp) for sh in b.shards(shard)]
        coll = comm_bytes(planned, shard, replicate, micro_batches)
        node_local, cross = sum(coll["shard"].values()), sum(coll["replicate"].values())
        if layout == "flat" and nodes > 1:  # a ring spanning nodes runs at its inter-node hops' speed
            node_local, cross = 0, node_local + cross
        label = COMM_LAYOUTS[layout].format(n=ranks, g=gpus, k=nodes)
        return CommEstimate(layout, label, nodes, gpus, shard, replicate, coll, node_local, cross,
                            sum(b.state(shard, s.weight_bytes)), *bws, micro_batches)

    ddp = micro_batches * int(round(2 * (n - 1) / n * s.psi * br)) if n > 1 else 0
    out = [zero("flat", n, 1), zero("hierarchical", gpus, nodes)]
    out.append(CommEstimate("ddp", COMM_LAYOUTS["ddp"].format(n=ranks), nodes, gpus, 1, n,
                            {"world": {"all_reduce": ddp}} if ddp else {}, 0 if nodes > 1 else ddp,
                            ddp if nodes > 1 else 0, (4 if s.mixed else 8) * s.psi, *bws, micro_batches))
    return out


def comm_sweep(spec: ModelSpec, nodes, gpus_per_node: int, dtype: str = "bf16", **kw) -> list[CommEstimate]:
    """:func:`comm_estimate` for each K in ``nodes`` (e.g. 1, 2, 4, ..., 128), G = ``gpus_per_node``: three
    records per K, in order."""
    return [e for k in nodes for e in comm_estimate(spec, k, gpus_per_node, dtype, **kw)]


# ---------------------------------------------------------------------------------------------------- output
_COLS = ("params", "grads", "opt state", "master/comp", "total")


def _rows(estimates: list[Estimate], w: int, div: int, notes: list[str]) -> list[str]:
    """One line per estimate (``div`` bytes per unit), note references into ``notes`` (extended)."""
    lines = []
    for e in estimates:
        refs = []
        for note in e.notes:
            if note not in notes:
                notes.append(note)
            refs.append(str(notes.index(note) + 1))
        vals = (e.params, e.grads, e.optimizer_state, e.master, e.total)
        lines.append(f"{e.label:<{w}}  " + "  ".join(f"{v / div:>11.2f}" for v in vals) + f"  {_fits(e):>16}  "
                     + ",".join(refs))
    return lines


def _fits(e: Estimate) -> str:
    """``"40,80 (+0.6)"``: the cards it fits on, and the GiB left on the smallest of them."""
    sizes = e.fits_on()
    if not sizes:
        return "none"
    return ",".join(map(str, sizes)) + f" (+{sizes[0] - GPU_RESERVE_GIB - e.total / 2**30:.1f})"


def _header(w: int, first: str) -> str:
    return f"{first:<{w}}  " + "  ".join(f"{c:>11}" for c in _COLS) + f"  {'fits on (GB)':>16}  notes"


def format_table(spec: ModelSpec, estimates: list[Estimate], world_size: int, dtype: str, bucket_size: int,
                 precision: tuple[str, list[Estimate]] | None = None) -> str:
    """The terminal table: one row per method, GiB (or MiB for small models) per rank, then -- ``precision`` =
    (the method's label, :func:`precision_estimates`) -- that method under each storage of the state, then the
    notes."""
    every = estimates + (precision[1] if precision else [])
    big = max((e.total for e in every), default=0) >= 2**30
    unit, div = ("GiB", 2**30) if big else ("MiB", 2**20)
    largest = spec.largest
    head = f"{spec.name}: {spec.numel:,} params"
    if largest:
        head += f" (largest tensor {largest[0]}: {largest[1]:,})"
    lines = [head, f"world size {world_size}, {dtype}, bucket size {bucket_size:,} elements; {unit} per rank", ""]
    w = max((len(e.label) for e in every), default=10)
    notes: list[str] = []
    lines += [_header(w, "method")] + _rows(estimates, w, div, notes)
    if precision:
        title, rows = precision
        lines += ["", f"{title}, by storage of the optimizer state (--state-dtype, --kahan):"]
        lines += [_header(w, "moments + weights")] + _rows(rows, w, div, notes)
    lines.append("")
    lines += [f"[{i}] {n}" for i, n in enumerate(notes, 1)]
    if spec.count_only is not None:
        lines.append("bare parameter count: synthetic tensors of one bucket each; LoRA needs layer shapes (pass a config)")
    lines.append(f"fits on (GB): the total is at most the card's memory less {GPU_RESERVE_GIB:g} GiB (CUDA context, "
                 "allocator); a 24 / 40 / 80 GB card has about 24 / 40 / 80 GiB. (+x): the GiB left on the smallest of "
                 "them, which must hold the activations.")
    lines.append("Activations, autograd's transient gradient and allocator overhead are not included.")
    return "\n".join(lines)


def _comm_footer(e: CommEstimate) -> list[str]:
    return [
        f"bandwidth per GPU, one direction: intra-node {e.intra_node_gbps:g} GB/s (--intra-node-gbps; default: H100 "
        f"SXM NVLink 4), inter-node {e.inter_node_gbps:g} GB/s (--inter-node-gbps; default: one 200 Gb/s NIC per GPU). "
        "GB = 1e9 bytes.",
        "time bound: intra-node bytes / intra-node bandwidth + inter-node bytes / inter-node bandwidth -- a lower "
        "bound: bandwidth only, no latency, no overlap with compute; 'overlapped': the larger of the two terms, if "
        "the node-local and cross-node phases of different buckets overlapped perfectly. A flat ring spanning nodes "
        "counts entirely on the inter-node links (its slowest hop sets its speed).",
        "state: zeroadamw's optimizer state + master (or Kahan compensation) per rank, sharded over 'state over' ranks "
        "(hierarchical: the GPUs of a node, as the memory rows of --world-size G); DDP: torch AdamW's, replicated.",
    ]


def _comm_head(spec: ModelSpec, e: CommEstimate, dtype: str, reduce_dtype: str, bucket_size: int) -> str:
    per = "per step" if e.micro_batches == 1 else f"per step of {e.micro_batches} reduced micro-batches"
    return (f"communication {per}, per rank: {spec.name}, {dtype} params, {reduce_dtype} gradients on the wire, "
            f"bucket size {bucket_size:,} elements")


def format_comm_table(spec: ModelSpec, estimates: list[CommEstimate], dtype: str, reduce_dtype: str,
                      bucket_size: int) -> str:
    """:func:`comm_estimate`'s rows for one K x G: state per rank, intra- and inter-node GB, time bounds."""
    e0 = estimates[0]
    w = max(len(e.label) for e in estimates)
    cols = ("state over", "state GiB", "intra-node GB", "inter-node GB", "time bound ms", "overlapped ms")
    lines = [_comm_head(spec, e0, dtype, reduce_dtype, bucket_size),
             f"{_plural(e0.nodes, 'node')} x {_plural(e0.gpus_per_node, 'GPU')} = {_plural(e0.world_size, 'rank')}",
             "",
             f"{'layout':<{w}}  " + "  ".join(f"{c:>13}" for c in cols)]
    for e in estimates:
        vals = (f"{e.shard}", f"{e.state / 2**30:.2f}", f"{e.intra_node / 1e9:.3f}", f"{e.inter_node / 1e9:.3f}",
                f"{e.time_s * 1e3:.1f}", f"{e.overlapped_s * 1e3:.1f}")
        lines.append(f"{e.label:<{w}}  " + "  ".join(f"{v:>13}" for v in vals))
    return "\n".join(lines + [""] + _comm_footer(e0))


def sweep_rows(estimates: list[CommEstimate]) -> list[dict]:
    """:func:`comm_sweep`'s records, one row per K: flat vs hierarchical (the numbers of the sweep table)."""
    rows = []
    for i in range(0, len(estimates), 3):
        flat, hier = estimates[i], estimates[i + 1]
        rows.append({"nodes": flat.nodes, "world_size": flat.world_size,
                     "flat_inter_gb": flat.inter_node / 1e9, "flat_intra_gb": flat.intra_node / 1e9,
                     "hier_inter_gb": hier.inter_node / 1e9, "hier_intra_gb": hier.intra_node / 1e9,
                     "flat_ms": flat.time_s * 1e3, "hier_ms": hier.time_s * 1e3,
                     "hier_overlapped_ms": hier.overlapped_s * 1e3,
                     "flat_state_gib": flat.state / 2**30, "hier_state_gib": hier.state / 2**30,
                     "speedup": flat.time_s / hier.time_s if hier.time_s else 1.0})
    return rows


SWEEP_COLUMNS = (("nodes", "K", "d"), ("world_size", "ranks", "d"), ("flat_intra_gb", "flat intra GB", ".2f"),
                 ("flat_inter_gb", "flat inter GB", ".2f"), ("hier_intra_gb", "hier intra GB", ".2f"),
                 ("hier_inter_gb", "hier inter GB", ".2f"), ("flat_ms", "flat ms", ".1f"),
                 ("hier_ms", "hier ms", ".1f"), ("hier_overlapped_ms", "hier overl. ms", ".1f"),
                 ("speedup", "flat/hier", ".2f"), ("flat_state_gib", "flat state GiB", ".2f"),
                 ("hier_state_gib", "hier state GiB", ".2f"))
"""The sweep table's columns: (key of :func:`sweep_rows`, header, format)."""


def format_comm_sweep(spec: ModelSpec, estimates: list[CommEstimate], dtype: str, reduce_dtype: str,
                      bucket_size: int) -> str:
    """:func:`comm_sweep` as one table: per K, flat vs hierarchical bytes, time bounds and state per rank."""
    e0 = estimates[0]
    lines = [_comm_head(spec, e0, dtype, reduce_dtype, bucket_size) + f"; {e0.gpus_per_node} GPUs per node",
             "flat: ZeRO over all K x G ranks; hier: shard over the G GPUs of a node, replicate over the K nodes; "
             "ms: the time lower bound", "",
             "  ".join(f"{h:>{max(len(h), 5)}}" for _, h, _ in SWEEP_COLUMNS)]
    for row in sweep_rows(estimates):
        lines.append("  ".join(f"{row[k]:>{max(len(h), 5)}{f}}" for k, h, f in SWEEP_COLUMNS))
    return "\n".join(lines + [""] + _comm_footer(e0))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL",
                        help="a Hugging Face config.json (or its directory), a name from configs/ or a built-in "
                             f"preset ({', '.join(PRESETS)}), or a parameter count (7e9, 7B, 1300000000)")
    parser.add_argument("--world-size", type=int, default=None,
                        help="data-parallel ranks N (default 1, or --nodes x --gpus-per-node)")
    parser.add_argument("--dtype", choices=tuple(DTYPE_BYTES), default="bf16",
                        help="param dtype; bf16 = mixed precision with fp32 master for DeepSpeed/zeroadamw (default)")
    parser.add_argument("--state-dtype", choices=STATE_DTYPES, default="fp32",
                        help="zeroadamw rows: storage of the Adam moments, ShardedAdamW(state_dtype=...): fp32 "
                             "(default), bf16, or int8 (block-wise 8-bit; tensors under 4096 elements stay fp32)")
    parser.add_argument("--kahan", action="store_true",
                        help="zeroadamw rows, bf16 params: master_dtype=None, kahan_sum=True -- a bf16 compensation "
                             "(2 B per element) instead of the fp32 master (4 B)")
    parser.add_argument("--precision-method", default=None, metavar="METHOD",
                        help="the zeroadamw method of the table by state storage (fp32 / bf16 / int8 moments x fp32 "
                             "master / Kahan); default: step_in_backward if selected, else the first zeroadamw method; "
                             "'none': no such table")
    parser.add_argument("--json", action="store_true", help="print one JSON record per method instead of a table")
    parser.add_argument("--bucket-size", type=int, default=None,
                        help="ShardedAdamW bucket_size in elements (default: ShardedAdamW's, about 1/32 of the "
                             f"trainable elements between 2**20 and {DEFAULT_BUCKET_SIZE})")
    parser.add_argument("--lora-rank", type=int, default=8, help="LoRA rank r (default 8, PEFT's default)")
    parser.add_argument("--lora-targets", default=",".join(DEFAULT_LORA_TARGETS),
                        help="comma-separated module names LoRA adapts (default: the attention projections)")
    parser.add_argument("--methods", default=None, help=f"comma-separated subset of: {', '.join(METHODS)}")
    parser.add_argument("--configs-dir", default=None, help="where named configs live (default: ./configs and the repo's)")
    comm = parser.add_argument_group("communication model (a table of per-step bytes and time bounds per rank)")
    comm.add_argument("--nodes", default=None, metavar="K[,K...]",
                      help="nodes K: prints flat ZeRO over K x G ranks vs hierarchical (shard over a node's G GPUs, "
                           "replicate over the K nodes) vs DDP; a list (1,2,4,8,16,32,64,128) prints a sweep table "
                           "instead of the memory table")
    comm.add_argument("--gpus-per-node", type=int, default=None, metavar="G",
                      help="GPUs per node G (the shard group of the hierarchical layout)")
    comm.add_argument("--intra-node-gbps", type=float, default=INTRA_NODE_GBPS, metavar="X",
                      help=f"GB/s per GPU, one direction, inside a node (default {INTRA_NODE_GBPS:g}: H100 SXM "
                           "NVLink 4, 900 GB/s both ways; better: your nccl-tests busbw)")
    comm.add_argument("--inter-node-gbps", type=float, default=INTER_NODE_GBPS, metavar="Y",
                      help=f"GB/s per GPU, one direction, between nodes (default {INTER_NODE_GBPS:g}: one 200 Gb/s "
                           "InfiniBand NIC per GPU; 400 Gb/s NICs: 50)")
    comm.add_argument("--reduce-dtype", choices=tuple(DTYPE_BYTES), default=None,
                      help="dtype gradients are reduced in, ShardedAdamW(reduce_dtype=...) (default: --dtype)")
    comm.add_argument("--micro-batches", type=int, default=1, metavar="M",
                      help="backward passes whose gradients are reduced per step (stage 2 outside no_sync(), step "
                           "in backward): reduce-scatter and all-reduce M times, all-gather once (default 1)")


def _parse_nodes(text: str) -> list[int]:
    parts = [t.strip() for t in text.split(",")]
    try:
        nodes = [int(t) for t in parts]
    except ValueError:
        nodes = []
    if not nodes or any(k < 1 for k in nodes):
        raise ValueError(f"--nodes takes a node count >= 1 or a comma-separated list of them (1,2,4,8), got {text!r}")
    return nodes


def topology(world_size: int | None, nodes: str | None,
             gpus_per_node: int | None) -> tuple[int, list[int] | None, int | None]:
    """The command line's (``--world-size``, ``--nodes``, ``--gpus-per-node``) -> (N of the memory table, the K
    values or ``None`` for no communication table, G). N = K x G; a list of K is a sweep (no N: ``0``). Any two of
    the three give the third; inconsistent ones are a ``ValueError`` that says so."""
    ks = None if nodes is None else _parse_nodes(nodes)
    if ks is None and gpus_per_node is None:
        return (1 if world_size is None else world_size), None, None
    if gpus_per_node is not None and gpus_per_node < 1:
        raise ValueError(f"--gpus-per-node must be >= 1, got {gpus_per_node}")
    if ks is not None and len(ks) > 1:
        if gpus_per_node is None:
            raise ValueError("a sweep over --nodes needs --gpus-per-node G")
        if world_size is not None:
            raise ValueError(f"--world-size {world_size} does not go with a list of --nodes: each K has its own "
                             "K x G ranks; drop --world-size")
        return 0, ks, gpus_per_node
    if ks is None:  # G alone: one node, or --world-size / G nodes
        k = 1 if world_size is None else world_size // gpus_per_node
        if world_size is not None and (world_size < 1 or world_size % gpus_per_node):
            raise ValueError(f"--world-size {world_size} is not a whole number of nodes of --gpus-per-node "
                             f"{gpus_per_node} GPUs; pass --nodes K, or a multiple of {gpus_per_node}")
        return k * gpus_per_node, [k], gpus_per_node
    k = ks[0]
    if gpus_per_node is None:
        if world_size is None or world_size < 1 or world_size % k:
            raise ValueError(f"--nodes {k} needs --gpus-per-node G (or a --world-size that is a multiple of {k})")
        return world_size, [k], world_size // k
    if world_size is not None and world_size != k * gpus_per_node:
        raise ValueError(f"--world-size {world_size} does not match --nodes {k} x --gpus-per-node {gpus_per_node} "
                         f"= {k * gpus_per_node} ranks; drop --world-size or make them agree")
    return k * gpus_per_node, [k], gpus_per_node


def _comm(args: argparse.Namespace, spec: ModelSpec, nodes: list[int], gpus: int) -> list[CommEstimate]:
    return comm_sweep(spec, nodes, gpus, args.dtype, reduce_dtype=args.reduce_dtype, bucket_size=args.bucket_size,
                      state_dtype=args.state_dtype, kahan=args.kahan, micro_batches=args.micro_batches,
                      intra_node_gbps=args.intra_node_gbps, inter_node_gbps=args.inter_node_gbps)


def run(args: argparse.Namespace) -> int:
    """Estimate and print; errors in the input go to stderr with exit status 2."""
    comm: list[CommEstimate] = []
    try:
        targets = tuple(t.strip() for t in args.lora_targets.split(",") if t.strip())
        if not targets:
            raise ValueError("--lora-targets is empty; name at least one module, e.g. q_proj,v_proj")
        methods = None if args.methods is None else [m.strip() for m in args.methods.split(",") if m.strip()]
        world, nodes, gpus = topology(args.world_size, args.nodes, args.gpus_per_node)
        spec = load_model(args.model, args.configs_dir)
        if nodes is not None:
            comm = _comm(args, spec, nodes, gpus)
        sweep = nodes is not None and len(nodes) > 1
        kw = dict(bucket_size=args.bucket_size, lora_rank=args.lora_rank, lora_targets=targets)
        ests = [] if sweep else estimate(spec, world, args.dtype, methods=methods, state_dtype=args.state_dtype,
                                         kahan=args.kahan, **kw)
        pm = args.precision_method
        pm = default_precision_method([e.method for e in ests]) if pm is None else (None if pm == "none" else pm)
        precision = None
        if pm is not None and not args.json and not sweep:
            precision = (METHODS[pm].format(r=args.lora_rank) if pm in METHODS else pm,
                         precision_estimates(spec, world, args.dtype, pm, **kw))
    except ValueError as e:
        print(f"zeroadamw estimate: error: {e}", file=sys.stderr)
        return 2
    bucket = args.bucket_size if args.bucket_size is not None else auto_bucket_size(spec.numel)
    reduce_dtype = args.reduce_dtype or args.dtype
    if args.json:
        common = {"model": spec.name, "total_params": spec.numel, "world_size": world, "dtype": args.dtype,
                  "bucket_size": bucket}
        memory = [dict(common, **e.record()) for e in ests]
        if nodes is None:
            print(json.dumps(memory, indent=1))
        else:
            common = {"model": spec.name, "total_params": spec.numel, "dtype": args.dtype,
                      "reduce_dtype": reduce_dtype, "bucket_size": bucket}
            out = {} if sweep else {"memory": memory}
            out["comm"] = [dict(common, **e.record()) for e in comm]
            print(json.dumps(out, indent=1))
    elif sweep:
        print(format_comm_sweep(spec, comm, args.dtype, reduce_dtype, bucket))
    else:
        print(format_table(spec, ests, world, args.dtype, bucket, precision))
        if comm:
            print("\n" + format_comm_table(spec, comm, args.dtype, reduce_dtype, bucket))
    return 0
