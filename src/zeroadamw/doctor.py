r"""``zeroadamw doctor``: check a training config for weight-decay, learning-rate and schedule mistakes.

::

    zeroadamw doctor CONFIG [--model MODEL_CONFIG] [--json]

.. code-block:: python

    from zeroadamw.doctor import diagnose
    for f in diagnose({"learning_rate": 2e-5, "weight_decay": 0.1, "max_steps": 1000}):
        print(f.severity, f.code, f.message)

Each finding has a stable kebab-case ``code``, a ``severity`` (``info`` < ``warn`` < ``error``), and three
sentences: ``message`` (what was found, with the numbers), ``why`` (why it matters) and ``fix`` (what to change).
Severity policy: **error** -- the run will be refused, or will silently not do what the config says;
**warn** -- likely to cost model quality; **info** -- worth knowing, often fine.

The CLI prints the findings (``--json``: ``{"findings": [...], "summary": {...}}``) and exits with **0** when no
finding is an error, **1** when at least one is, **2** when CONFIG (or MODEL_CONFIG) cannot be read.

Input
-----

CONFIG is a JSON object in either of two forms (told apart automatically; ``"format": "hf"`` or ``"flags"``
forces one), or a text file of ``--flag value`` launch flags (``--lr 3e-4 --weight-decay 0.1 --step-in-backward``;
a bare flag means ``true``; ``-`` and ``_`` are the same).

* **HF** ``TrainingArguments`` **JSON** (``args.to_json_string()`` or a hand-written subset): ``learning_rate``,
  ``weight_decay``, ``adam_beta1``, ``adam_beta2``, ``adam_epsilon``, ``max_steps``, ``num_train_epochs``,
  ``warmup_steps`` (a float < 1 is a ratio, as in transformers 5), ``warmup_ratio``, ``lr_scheduler_type``,
  ``gradient_accumulation_steps``, ``max_grad_norm``, ``fp16``, ``optim`` (``adamw_torch``, ``lomo``, ...,
  or ``zeroadamw``), ``optim_args`` (``"decay=independent,stage=2"``), ``resume_from_checkpoint``,
  ``save_only_model``, ``ignore_data_skip``. Missing keys take TrainingArguments' defaults (listed under
  ``summary.assumed``); ``optim``'s is read from the installed transformers (``adamw_torch_fused`` with torch ≥ 2.8,
  else ``adamw_torch``; both are torch's AdamW, decoupled decay), by the same rule when transformers is absent.
* **Launch flags** of ours (ShardedAdamW's names; missing keys take ShardedAdamW's defaults): ``lr``,
  ``weight_decay``, ``betas`` (or ``beta1``/``beta2``), ``eps``, ``decay`` (``decoupled`` | ``independent`` |
  ``l2``), ``stage``, ``step_in_backward``, ``rule`` (``adamw`` | ``lomo`` | ``adalomo``), ``max_grad_norm``,
  ``grads_reduced``, ``steps`` / ``max_steps``, ``epochs``, ``warmup_steps``, ``lr_scheduler_type``,
  ``grad_accum``; the storage of the state: ``state_dtype`` (``fp32`` | ``bf16`` | ``int8``), ``master_dtype``
  (``null`` / ``none``: no fp32 master), ``kahan_sum`` (in the HF form through ``optim_args``, e.g.
  ``"state_dtype=int8,master_dtype=none,kahan_sum=true"``).

Keys both forms understand:

* **Run length.** ``steps_per_epoch`` = *optimizer* steps (updates, after gradient accumulation) per epoch.
  Alternatively ``batches_per_epoch`` = micro-batches per rank per epoch (``len(train_dataloader)``), turned into
  updates as HF Trainer does: ``max(batches_per_epoch // gradient_accumulation_steps, 1)``; or
  ``num_train_samples`` with ``per_device_train_batch_size`` and ``world_size`` (default 1). The run is
  ``max_steps`` updates when > 0, else ``ceil(num_train_epochs * steps_per_epoch)``. Every "step" in the report is
  an optimizer step.
* **Which params get decay.** ``no_decay_groups`` (bool): norms and biases sit in a ``weight_decay=0`` group
  (HF Trainer's split; default ``true`` for the HF form, ``false`` for launch flags, i.e.
  ``ShardedAdamW(model.parameters(), ...)``); ``decay_norms_and_biases`` is its negation;
  ``decay_embeddings`` (bool, default ``true``: both HF Trainer and ``model.parameters()`` decay embeddings);
  ``no_decay`` (list of regular expressions searched in parameter names; when given it alone decides).
* **Resuming.** ``resume_from_checkpoint`` (path or ``true``) with ``load_optimizer: false`` (also
  ``load_optimizer_state: false``, ``skip_optimizer_state: true``) or HF's ``save_only_model: true``.
* **Precision.** ``param_dtype`` (also ``dtype``, ``torch_dtype``, or ``model_init_kwargs.torch_dtype``): the
  dtype the model's weights are loaded in (``bf16``, ``fp16``, ``fp32``; HF's ``bf16: true`` is autocast and
  says nothing about it). Trainable tensors, for ``int8-small-tensors``: MODEL_CONFIG's (a full fine-tune), or its
  LoRA adapters with ``lora_r`` (``lora_rank``) and ``lora_target_modules`` (a list, a comma list or
  ``all-linear``; default ``q_proj,v_proj``, PEFT's for Llama), also as a ``lora`` / ``lora_config`` /
  ``peft_config`` section with ``r`` and ``target_modules``.
* **Other.** ``fp16``, ``world_size``, ``lr_max`` / ``peak_lr`` (the schedule's peak when it is not ``lr``),
  ``deepspeed`` / ``zero_optimization`` / ``fsdp`` (a sharded setup, for ``bnb-8bit-with-sharding``).

MODEL_CONFIG (``--model``) is a Hugging Face ``config.json``. The parameter names and shapes come from building the
model on the ``meta`` device with transformers (no weights, no memory) when transformers is installed, else from
the Llama layout (``embed_tokens``, ``q/k/v/o_proj``, ``gate/up/down_proj``, ``*_layernorm``, ``norm``,
``lm_head`` unless ``tie_word_embeddings``; biases from ``attention_bias`` / ``mlp_bias``). With it, the decay
findings name the parameters and count their elements.

Timescale
---------

Wang & Aitchison (ICML 2025, "How to set AdamW's weight decay as you scale model and dataset size") read AdamW's
weights as an exponential moving average of recent updates with timescale :math:`\tau = 1/(\eta\lambda)` steps;
:math:`\tau_{epoch} = \tau / \text{steps per epoch}` should lie between about one epoch (average over all the
data) and the whole run (forget the initialisation), and the best :math:`\tau_{epoch}` stays roughly constant as
model and data scale. The per-step decay factor of each mode, at the schedule's peak lr :math:`\eta_{max}`:

* ``decoupled`` (``torch.optim.AdamW``): :math:`1 - \eta_t\lambda` -> :math:`\tau = 1/(\eta_{max}\lambda)`;
* ``independent``: :math:`1 - \lambda\eta_t/\eta_{max}` -> :math:`\tau = 1/\lambda` (lr does not enter);
* ``l2`` with an adaptive rule: the decay passes through Adam's :math:`1/\sqrt{v}`, so there is no single
  timescale (``l2-with-adam``); with SGD (``rule="lomo"``, ``optim: sgd``) L2 is decoupled decay: :math:`\tau =
  1/(\eta_{max}\lambda)`.

τ is quoted at the peak lr; a decaying schedule makes the timescale longer later in the run. "About" is a factor
of :data:`TAU_TOLERANCE`: ``tau-too-short`` below half an epoch, ``tau-too-long`` above twice the run. A run of at
most one epoch (LLM pre-training, single-pass fine-tuning) cannot satisfy "≥ 1 epoch"; there, and when the epoch
length is unknown, ``tau-too-short`` fires below :data:`TAU_MIN_RUN_FRACTION` of the run (Llama 2's lr 3e-4,
λ 0.1 over ~500k steps gives τ ≈ 0.07 of its run).

Findings
--------

Each kind is defined once in :data:`FINDINGS` (code, severity, title, why, fix); each check in :data:`CHECKS` reads
the :class:`Context` that :func:`build_context` derives once from the config and returns its findings.

========================================  ========  =========================================================
code                                      severity  fires when
========================================  ========  =========================================================
``invalid-value``                         error     a value the optimizer would refuse (β ≥ 1, lr ≤ 0, ...)
``tau-too-short``                         warn      τ < ½ epoch (or < 2 % of a single-pass run); **error**
                                                    when η·λ ≥ 1 (the decay zeroes or flips weights)
``tau-too-long``                          warn      τ > 2 × run: the decay hardly acts
``tau-undefined``                         info      weight_decay = 0: no timescale, no decay
``l2-with-adam``                          warn      ``decay="l2"`` (or torch Adam/Adagrad/RMSprop L2) with an
                                                    adaptive rule
``decay-on-norms-biases``                 warn      norm gains / biases are decayed
``decay-on-embeddings``                   info      embeddings are decayed
``decay-ignored``                         warn      HF ``optim: lomo|adalomo`` with weight_decay > 0 (Trainer
                                                    passes only ``lr`` to lomo_optim)
``warmup-missing``                        warn      an adaptive rule without warm-up (and not resuming state)
``warmup-too-long``                       warn      warm-up > 25 % of the run; **error** when ≥ the run
``warmup-ignored``                        warn      warm-up set, but the scheduler has none (HF ``constant``,
                                                    ``reduce_lr_on_plateau``)
``beta2-too-long-for-run``                warn      1/(1-β2) > 25 % of the run
``accumulation-unsupported``              error     gradient accumulation with HF ``optim: lomo|adalomo``
``clipping-unsupported``                  error     ``max_grad_norm`` with HF ``optim: lomo|adalomo``
``accumulation-needs-no-sync``            info      ``step_in_backward`` without clipping + accumulation
``fp16-fused-step-in-backward``           error     ``step_in_backward`` without ``max_grad_norm`` + fp16
``ddp-with-stage-2``                      error     ``grads_reduced`` (DDP) with stage 2 / step in backward
``resume-without-optimizer-state``        error     resuming with the optimizer state not loaded / not saved
``resume-data-not-skipped``               info      resuming with ``ignore_data_skip: true``
``independent-without-schedule-peak``     warn      ``decay="independent"`` where the optimizer's lr is not the
                                                    schedule's peak (unknown scheduler, or a peak ≠ lr given)
``run-length-unknown``                    info      neither ``max_steps`` nor epochs × steps per epoch
``steps-per-epoch-unknown``               info      the run length is known but not the epoch length
``no-master-no-kahan``                    warn      bf16/fp16 weights updated in their own dtype: ours with
                                                    ``master_dtype=None`` and no ``kahan_sum``, or torch AdamW
                                                    on a model loaded in bf16/fp16
``int8-small-tensors``                    info      ``state_dtype="int8"`` where most trainable elements are in
                                                    tensors under 4096 elements (they keep fp32 moments)
``bnb-8bit-with-sharding``                info      a bitsandbytes 8-bit optimizer with several ranks, DeepSpeed
                                                    or FSDP (``state_dtype="int8"`` shards the same state)
========================================  ========  =========================================================
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shlex
import sys
import textwrap
from dataclasses import dataclass, field
from typing import Any, Callable

__all__ = ["Finding", "FindingKind", "FINDINGS", "CODES", "CHECKS", "Context", "build_context", "diagnose", "summarize",
           "hf_default_optim", "suggested_warmup_steps", "model_parameters", "load_config", "add_arguments", "run"]

SEVERITIES = ("info", "warn", "error")

TAU_TOLERANCE = 2.0
""""About one epoch to the whole run": tau-too-short below 1/2 epoch, tau-too-long above 2x the run."""
TAU_MIN_RUN_FRACTION = 0.02
"""Runs of at most one epoch (or of unknown epoch length): tau-too-short below this fraction of the run."""
WARMUP_MAX_FRACTION = 0.25
"""warmup-too-long above this fraction of the run."""
BETA2_MAX_RUN_FRACTION = 0.25
"""beta2-too-long-for-run when 1/(1-beta2) exceeds this fraction of the run."""
INT8_MIN_NUMEL = 4096
"""``zeroadamw.quant.MIN_QUANTIZED_NUMEL``: smaller tensors keep fp32 moments under ``state_dtype="int8"``."""
INT8_FP32_FRACTION = 0.5
"""int8-small-tensors when at least this fraction of the trainable elements sits in tensors under 4096 elements."""

_INSTALLED_DEFAULT = object()  # a default read from the installed transformers when needed (hf_default_optim)
# HF TrainingArguments defaults (transformers 4.46 - 5.x) for the keys the doctor reads
HF_DEFAULTS: dict[str, Any] = {
    "learning_rate": 5e-5, "weight_decay": 0.0, "adam_beta1": 0.9, "adam_beta2": 0.999, "adam_epsilon": 1e-8,
    "num_train_epochs": 3.0, "max_steps": -1, "warmup_steps": 0, "warmup_ratio": 0.0, "lr_scheduler_type": "linear",
    "gradient_accumulation_steps": 1, "max_grad_norm": 1.0, "optim": _INSTALLED_DEFAULT,
}
# ShardedAdamW's defaults
FLAG_DEFAULTS: dict[str, Any] = {
    "learning_rate": 1e-3, "weight_decay": 1e-2, "adam_beta1": 0.9, "adam_beta2": 0.999, "adam_epsilon": 1e-8,
    "optim": "zeroadamw", "decay": "decoupled", "stage": 2, "rule": "adamw", "max_grad_norm": None,
    "gradient_accumulation_steps": 1, "warmup_steps": 0,
}

_ALIASES = {
    "lr": "learning_rate", "wd": "weight_decay", "beta1": "adam_beta1", "beta2": "adam_beta2",
    "beta_1": "adam_beta1", "beta_2": "adam_beta2", "eps": "adam_epsilon", "epsilon": "adam_epsilon",
    "optimizer": "optim", "optimizer_type": "optim", "steps": "max_steps", "total_steps": "max_steps",
    "train_steps": "max_steps", "num_steps": "max_steps", "epochs": "num_train_epochs",
    "num_epochs": "num_train_epochs",
    "warmup": "warmup_steps", "num_warmup_steps": "warmup_steps", "grad_accum": "gradient_accumulation_steps",
    "accumulation_steps": "gradient_accumulation_steps", "gradient_accumulation": "gradient_accumulation_steps",
    "grad_accumulation_steps": "gradient_accumulation_steps", "scheduler": "lr_scheduler_type",
    "lr_scheduler": "lr_scheduler_type", "schedule": "lr_scheduler_type", "grad_clip": "max_grad_norm",
    "clip_grad_norm": "max_grad_norm", "clip": "max_grad_norm", "resume": "resume_from_checkpoint",
    "resume_from": "resume_from_checkpoint", "load_optimizer_state": "load_optimizer",
    "train_samples": "num_train_samples", "dataset_size": "num_train_samples", "num_examples": "num_train_samples",
    "batch_size": "per_device_train_batch_size", "micro_batch_size": "per_device_train_batch_size",
    "len_dataloader": "batches_per_epoch", "dataloader_length": "batches_per_epoch",
    "nproc": "world_size", "nproc_per_node": "world_size", "num_processes": "world_size", "peak_lr": "lr_max",
    "max_lr": "lr_max",
    "kahan": "kahan_sum", "dtype": "param_dtype", "torch_dtype": "param_dtype", "model_dtype": "param_dtype",
    "lora_rank": "lora_r", "target_modules": "lora_target_modules",
}
# keys only a TrainingArguments-style config has (any of them -> the HF form)
_HF_MARKERS = ("output_dir", "per_device_train_batch_size", "adam_beta1", "adam_beta2", "adam_epsilon",
               "num_train_epochs", "optim", "optim_args", "learning_rate", "warmup_ratio",
               "save_strategy", "logging_steps", "resume_from_checkpoint", "save_only_model", "ignore_data_skip")
# keys only ShardedAdamW has: with the HF form and no `optim`, they mean optim=zeroadamw
_OURS_MARKERS = ("decay", "stage", "step_in_backward", "rule", "grads_reduced", "state_dtype", "master_dtype",
                 "kahan_sum")

# HF scheduler names whose peak is the optimizer's lr (LambdaLR multiplies initial_lr by a factor <= 1)
_KNOWN_SCHEDULES = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
                    "inverse_sqrt", "reduce_lr_on_plateau", "cosine_with_min_lr", "cosine_warmup_with_min_lr",
                    "warmup_stable_decay", "wsd", "one_cycle", "onecycle", "none", "exponential", "step", "multistep")
_NO_WARMUP_SCHEDULES = ("constant", "reduce_lr_on_plateau", "greedy")
_ADAPTIVE_L2 = ("adagrad", "rmsprop", "adam")  # torch optimizers whose weight_decay is an L2 term through 1/sqrt(v)
# HF Trainer's no-decay name patterns (transformers' Trainer.get_decay_parameter_names)
_HF_NO_DECAY_PATTERNS = (r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)")
# representative names used to judge decay groups when no model is given
_TYPICAL = {
    "norm": ["model.layers.0.input_layernorm.weight", "model.norm.weight"],
    "bias": ["model.layers.0.self_attn.q_proj.bias"],
    "embedding": ["model.embed_tokens.weight"],
}


# ------------------------------------------------------------------------------------------------ findings
@dataclass(frozen=True)
class Finding:
    """One diagnosis: ``code`` (stable, kebab-case), ``severity`` (info / warn / error), ``message`` (what),
    ``why`` (why it matters), ``fix`` (what to change) and ``data`` (the numbers behind it, JSON-able)."""

    code: str
    severity: str
    message: str
    why: str
    fix: str
    data: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.code not in CODES:
            raise ValueError(f"unknown finding code {self.code!r}")
        if self.severity not in SEVERITIES:
            raise ValueError(f"unknown severity {self.severity!r}")

    def to_dict(self) -> dict:
        return {"code": self.code, "severity": self.severity, "message": self.message, "why": self.why,
                "fix": self.fix, "data": _jsonable(self.data)}


def _jsonable(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


def _fmt(x: float | None, digits: int = 3) -> str:
    if x is None:
        return "?"
    if x == 0:
        return "0"
    if abs(x) >= 1e5 or abs(x) < 1e-3:
        return f"{x:.{digits - 1}e}"
    return f"{x:.{digits}g}"


def _steps(x: float) -> str:
    return f"{x:,.0f}" if x >= 10 else f"{x:.3g}"


# ------------------------------------------------------------------------------------------- config input
def load_config(path: str) -> dict:
    """Read CONFIG: a JSON object, or a file of ``--flag value`` launch flags. ``-`` reads stdin."""
    if path == "-":
        text = sys.stdin.read()
    else:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    stripped = text.strip()
    if stripped.startswith("{"):
        cfg = json.loads(stripped)
        if not isinstance(cfg, dict):
            raise ValueError("CONFIG must be a JSON object")
        return cfg
    return parse_flags(shlex.split(stripped.replace("\\\n", " "), comments=True))


def parse_flags(tokens: list[str]) -> dict:
    """``["--lr", "3e-4", "--step-in-backward", "--betas=0.9,0.95"]`` -> ``{"lr": 3e-4, "step_in_backward": True,
    "betas": [0.9, 0.95]}``; a value that is not JSON (or a comma list of JSON) stays a string."""
    out: dict[str, Any] = {"format": "flags"}
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        if not tok.startswith("--"):
            i += 1  # a program name or positional argument
            continue
        key, eq, val = tok[2:].partition("=")
        key = key.replace("-", "_")
        if not eq:
            if i + 1 < len(tokens) and not tokens[i + 1].startswith("--"):
                val = tokens[i + 1]
                i += 1
            else:
                out[key] = True
                i += 1
                continue
        out[key] = _parse_value(val)
        i += 1
    return out


def _parse_value(val: str):
    try:
        return json.loads(val)
    except ValueError:
        pass
    low = val.lower()
    if low in ("true", "yes", "on"):
        return True
    if low in ("false", "no", "off"):
        return False
    if low in ("none", "null"):
        return None
    if "," in val:
        return [_parse_value(v.strip()) for v in val.split(",")]
    return val


def _flatten(cfg: dict) -> dict:
    """Merge nested sections (``training_args``, ``optimizer: {type, params}``, ``optim_args``) into one flat dict
    with canonical keys."""
    flat: dict[str, Any] = {}

    def put(k, v, overwrite=True):
        k = str(k).lstrip("-").replace("-", "_").lower()
        k = _ALIASES.get(k, k)
        if overwrite or k not in flat:
            flat[k] = v

    for section in ("training_args", "args", "trainer", "training"):
        if isinstance(cfg.get(section), dict):
            for k, v in cfg[section].items():
                put(k, v)
    for k, v in cfg.items():
        if isinstance(v, dict) and k in ("training_args", "args", "trainer", "training"):
            continue
        if k in ("optimizer", "optim") and isinstance(v, dict):  # {"type": "AdamW", "params": {...}} (DeepSpeed-like)
            name = v.get("type", v.get("name"))
            if name is not None:
                put("optim", name)
            params = v.get("params", {k2: v2 for k2, v2 in v.items() if k2 not in ("type", "name")})
            for k2, v2 in params.items():
                put(k2, v2)
            continue
        put(k, v)
    if isinstance(flat.get("lr_scheduler_kwargs"), dict):
        for k, v in flat["lr_scheduler_kwargs"].items():
            if k in ("max_lr", "peak_lr", "lr_max"):
                put("lr_max", v, overwrite=False)
    oa = flat.get("optim_args")
    if isinstance(oa, str) and oa.strip():
        for item in oa.split(","):
            k, eq, v = item.partition("=")
            if eq:
                put(k.strip(), _parse_value(v.strip()), overwrite=False)
    elif isinstance(oa, dict):
        for k, v in oa.items():
            put(k, v, overwrite=False)
    mik = flat.get("model_init_kwargs")  # TRL's SFTConfig: how the model is loaded
    if isinstance(mik, dict) and (mik.get("torch_dtype") or mik.get("dtype")):
        put("param_dtype", mik.get("torch_dtype") or mik.get("dtype"), overwrite=False)
    for section in ("lora", "lora_config", "peft_config"):
        if isinstance(cfg.get(section), dict):
            for k, v in cfg[section].items():
                put({"r": "lora_r", "target_modules": "lora_target_modules"}.get(k, f"lora_{k}"), v, overwrite=False)
    betas = flat.pop("betas", None)
    if isinstance(betas, str):
        betas = _parse_value(betas)
    if isinstance(betas, (list, tuple)) and len(betas) == 2:
        flat.setdefault("adam_beta1", betas[0])
        flat.setdefault("adam_beta2", betas[1])
    return flat


def _truthy(v) -> bool:
    if isinstance(v, str):
        return v.strip().lower() not in ("", "false", "no", "0", "none", "null", "off")
    return bool(v)


def _num(v, default=None):
    if v is None or isinstance(v, bool):
        return default
    try:
        return float(v)
    except (TypeError, ValueError):
        return default


@dataclass
class _Run:
    """The normalised config the checks read."""

    format: str
    optim: str
    zero: bool
    rule: str
    decay: str
    adaptive: bool
    lr: float
    wd: float
    beta1: float
    beta2: float
    eps: float
    grad_accum: int
    max_grad_norm: float | None
    total_steps: int | None
    steps_per_epoch: float | None
    warmup: int
    scheduler: str | None
    raw: dict
    assumed: list[str]
    invalid: list[tuple[str, str]]


def hf_default_optim() -> str:
    """The ``optim`` a ``TrainingArguments`` gets when the config does not name one.

    Read from the installed transformers (``adamw_torch_fused`` in transformers 5 with torch >= 2.8, ``adamw_torch``
    before); without transformers, the same rule transformers applies: ``adamw_torch_fused`` when the installed torch
    is >= 2.8 (or unknown), else ``adamw_torch``. Both are torch's AdamW (decoupled decay), fused or not.
    """
    global _hf_default_optim
    if _hf_default_optim is None:
        _hf_default_optim = _installed_hf_default_optim() or _torch_rule_default_optim()
    return _hf_default_optim


_hf_default_optim: str | None = None  # cached: importing transformers' TrainingArguments takes seconds


def _installed_hf_default_optim() -> str | None:
    try:
        import dataclasses

        from transformers import TrainingArguments

        default = next(f.default for f in dataclasses.fields(TrainingArguments) if f.name == "optim")
    except Exception:  # noqa: BLE001 - transformers missing, broken, or without the field: fall back
        return None
    default = getattr(default, "value", default)  # an OptimizerNames member in some versions
    return default if isinstance(default, str) and default else None


def _torch_rule_default_optim() -> str:
    from importlib import metadata

    try:
        major, minor = (int(re.match(r"\d+", p).group()) for p in metadata.version("torch").split(".")[:2])
    except Exception:  # noqa: BLE001 - torch not installed or an odd version string: assume a current torch
        return "adamw_torch_fused"
    return "adamw_torch_fused" if (major, minor) >= (2, 8) else "adamw_torch"


def _detect_format(cfg: dict, raw: dict) -> str:
    fmt = str(raw.get("format", "")).lower()
    if fmt in ("hf", "flags"):
        return fmt
    keys = set(cfg)
    if isinstance(cfg.get("training_args"), dict):
        keys |= {str(k) for k in cfg["training_args"]}
    return "hf" if "training_args" in cfg or keys & set(_HF_MARKERS) else "flags"


def _optimizer_kind(optim: str, raw: dict, assumed: list, invalid: list) -> tuple[bool, str, str]:
    """(zero, rule, decay) of the optimizer ``optim`` names."""
    zero = optim in ("zeroadamw", "shardedadamw", "sharded_adamw", "zero_adamw")
    if zero:
        rule = str(raw.get("rule") or "adamw").lower()
        decay = str(raw.get("decay") or "decoupled").lower()
        if "decay" not in raw:
            assumed.append("decay='decoupled'")
        if rule not in ("adamw", "lomo", "adalomo"):
            invalid.append(("rule", f"rule={rule!r} is not one of adamw, lomo, adalomo"))
        return zero, rule, decay
    rule = ("lomo" if optim == "lomo" else "adalomo" if optim == "adalomo" else
            "sgd" if optim.startswith("sgd") else "adafactor" if "adafactor" in optim else "adamw")
    if optim in _ADAPTIVE_L2 or optim.startswith(("adagrad", "rmsprop", "sgd")):
        decay = "l2"  # torch's weight_decay for these is an L2 term added to the gradient
    else:
        decay = "decoupled"  # adamw_torch, adamw_torch_fused, adamw_*, adafactor, lomo_optim: theta *= 1 - lr * wd
    return zero, rule, decay


def _validate(run: _Run, invalid: list) -> None:
    """Append (key, why) for each value the optimizer would refuse."""
    if not run.lr > 0:
        invalid.append(("learning_rate", f"learning rate {run.lr} is not > 0"))
    if run.wd < 0:
        invalid.append(("weight_decay", f"weight_decay {run.wd} is negative"))
    for name, b in (("adam_beta1", run.beta1), ("adam_beta2", run.beta2)):
        if not 0.0 <= b < 1.0:
            invalid.append((name, f"{name} = {b} is outside [0, 1)"))
    if run.eps < 0:
        invalid.append(("adam_epsilon", f"epsilon {run.eps} is negative"))
    if run.decay not in ("decoupled", "independent", "l2"):
        invalid.append(("decay", f"decay={run.decay!r} is not one of decoupled, independent, l2"))
    if run.grad_accum < 1:
        invalid.append(("gradient_accumulation_steps", f"gradient_accumulation_steps = {run.grad_accum} is < 1"))
        run.grad_accum = 1
    if run.zero:
        stage = run.raw.get("stage", 2)
        if stage not in (1, 2) or isinstance(stage, bool):
            invalid.append(("stage", f"stage={stage!r} is not 1 or 2"))
        if _truthy(run.raw.get("step_in_backward")) and stage == 1:
            invalid.append(("stage", "step_in_backward needs stage=2 (it reduces and updates during backward)"))
        _validate_precision(run, invalid)


_STATE_DTYPES = ("fp32", "bf16", "int8")  # zeroadamw.storage.STATE_DTYPES


def _precision_options(raw: dict) -> tuple[str | None, bool, bool]:
    """ShardedAdamW's (state_dtype, an fp32 master for bf16/fp16 params, kahan_sum) as the config sets them:
    state_dtype None (or "auto") = automatic; master_dtype absent = fp32 (the default), null / "none" = none."""
    sd = raw.get("state_dtype")
    sd = None if sd is None or str(sd).strip().lower() in ("", "auto", "none", "null") else str(sd).strip().lower()
    master = not ("master_dtype" in raw and (raw["master_dtype"] is None or
                                             str(raw["master_dtype"]).strip().lower() in ("", "none", "null")))
    return sd, master, _truthy(raw.get("kahan_sum", False))


def _validate_precision(run: _Run, invalid: list) -> None:
    """state_dtype / master_dtype / kahan_sum: what ShardedAdamW's constructor refuses (options.validate_precision)."""
    sd, master, kahan = _precision_options(run.raw)
    if sd is not None and sd not in _STATE_DTYPES:
        invalid.append(("state_dtype", f"state_dtype={run.raw['state_dtype']!r} is not one of "
                        f"{', '.join(_STATE_DTYPES)} (or unset: automatic)"))
    elif sd not in (None, "fp32") and run.rule != "adamw":
        invalid.append(("state_dtype", f"state_dtype={sd!r} stores Adam moments; rule={run.rule!r} keeps none"))
    if kahan and master:
        invalid.append(("master_dtype", "kahan_sum=True replaces the fp32 master by a compensation buffer and "
                        "needs master_dtype=None (null), which the config does not set"))
    if kahan and run.rule == "adalomo":
        invalid.append(("kahan_sum", "kahan_sum=True is implemented for rule adamw and lomo, not adalomo"))


def _steps_per_epoch(raw: dict, ga: int, invalid: list) -> float | None:
    """Optimizer steps per epoch: given, or from batches per epoch / samples, // accumulation as HF Trainer does."""
    spe = _num(raw.get("steps_per_epoch"))
    if spe is None and _num(raw.get("batches_per_epoch")):
        spe = float(max(int(_num(raw["batches_per_epoch"])) // ga, 1))
    if spe is None and _num(raw.get("num_train_samples")) and _num(raw.get("per_device_train_batch_size")):
        world = int(_num(raw.get("world_size"), 1) or 1)
        batches = math.ceil(_num(raw["num_train_samples"]) / (_num(raw["per_device_train_batch_size"]) * world))
        spe = float(max(batches // ga, 1))
    if spe is not None and not spe > 0:
        invalid.append(("steps_per_epoch", f"steps_per_epoch = {spe} is not > 0"))
        spe = None
    return spe


def _total_steps(raw: dict, epochs: Callable[[], float | None], spe: float | None) -> int | None:
    """The run, in optimizer steps: ``max_steps`` when > 0, else ceil(epochs x steps per epoch). ``epochs`` is
    called only when ``max_steps`` does not decide (reading HF's default lists it under ``assumed``)."""
    max_steps = _num(raw.get("max_steps"))
    if max_steps is not None and max_steps > 0:
        return int(max_steps)
    epochs = epochs()
    if epochs is not None and epochs > 0 and spe is not None:
        return int(math.ceil(epochs * spe))
    return None


def _warmup_steps(raw: dict, total: int | None) -> int:
    """Warm-up in optimizer steps (HF: warmup_steps >= 1 is steps, a float < 1 a ratio; else warmup_ratio);
    -1 when it is a ratio of an unknown run length."""
    ws = _num(raw.get("warmup_steps"), 0.0) or 0.0
    wr = _num(raw.get("warmup_ratio"), 0.0) or 0.0
    if ws >= 1:
        return int(ws)
    if 0 < ws < 1:
        return math.ceil(total * ws) if total else -1
    if wr > 0:
        return math.ceil(total * wr) if total else -1
    return 0


def _normalise(cfg: dict) -> _Run:
    raw = _flatten(cfg)
    fmt = _detect_format(cfg, raw)
    defaults = HF_DEFAULTS if fmt == "hf" else FLAG_DEFAULTS
    assumed: list[str] = []
    invalid: list[tuple[str, str]] = []

    def get(key):
        if key in raw and raw[key] is not None:
            return raw[key]
        if key in defaults:
            value = hf_default_optim() if defaults[key] is _INSTALLED_DEFAULT else defaults[key]
            if value is not None:
                assumed.append(f"{key}={value!r}")
            return value
        return None

    if "optim" not in raw and fmt == "hf" and any(k in raw for k in _OURS_MARKERS):
        raw["optim"] = "zeroadamw"
    optim = str(get("optim") or ("zeroadamw" if fmt == "flags" else hf_default_optim())).lower()
    zero, rule, decay = _optimizer_kind(optim, raw, assumed, invalid)
    lr = _num(get("learning_rate"), 0.0)
    wd = _num(get("weight_decay"), 0.0)
    beta1 = _num(get("adam_beta1"), 0.9)
    beta2 = _num(get("adam_beta2"), 0.999)
    eps = _num(get("adam_epsilon"), 1e-8)
    ga = int(_num(get("gradient_accumulation_steps"), 1) or 1)
    mgn = _num(get("max_grad_norm"))
    mgn = mgn if mgn is not None and mgn > 0 else None
    run = _Run(fmt, optim, zero, rule, decay, rule not in ("lomo", "sgd"), lr, wd, beta1, beta2, eps, ga, mgn,
               None, None, 0, None, raw, assumed, invalid)
    _validate(run, invalid)
    run.steps_per_epoch = _steps_per_epoch(raw, run.grad_accum, invalid)
    epochs = (lambda: _num(get("num_train_epochs"))) if fmt == "hf" else (lambda: _num(raw.get("num_train_epochs")))
    run.total_steps = _total_steps(raw, epochs, run.steps_per_epoch)
    run.warmup = _warmup_steps(raw, run.total_steps)
    sched = raw.get("lr_scheduler_type", defaults.get("lr_scheduler_type"))
    run.scheduler = None if sched is None else str(sched).lower()
    return run


# ------------------------------------------------------------------------------------------------- model
@dataclass(frozen=True)
class ParamInfo:
    name: str
    numel: int
    kind: str  # "embedding" | "norm" | "bias" | "matrix"
    shape: tuple[int, ...] = ()


def model_parameters(model_config: dict, use_transformers: bool = True) -> list[ParamInfo]:
    """Trainable parameters of the model a ``config.json`` describes: names, sizes, kinds.

    With transformers installed the model is built on the ``meta`` device (exact for any architecture, no memory);
    otherwise (or ``use_transformers=False``) the Llama layout is assumed.
    """
    if use_transformers:
        try:
            return _params_from_transformers(model_config)
        except Exception:  # noqa: BLE001 - no transformers, unknown model_type, ...: fall back to the Llama layout
            pass
    return _params_llama_layout(model_config)


def _params_from_transformers(model_config: dict) -> list[ParamInfo]:
    import torch
    from torch import nn
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(model_config)
    model_type = cfg.pop("model_type")
    for k in ("architectures", "transformers_version", "_name_or_path", "torch_dtype", "dtype"):
        cfg.pop(k, None)
    config = AutoConfig.for_model(model_type, **cfg)
    with torch.device("meta"):
        try:
            model = AutoModelForCausalLM.from_config(config)
        except ValueError:
            from transformers import AutoModel

            model = AutoModel.from_config(config)
    out = []
    for mname, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            full = f"{mname}.{pname}" if mname else pname
            out.append((full, p, module, pname))
    seen: set[int] = set()
    params = []
    for full, p, module, pname in out:
        if id(p) in seen:  # tied weights: listed once, under the first (embedding) name
            continue
        seen.add(id(p))
        if isinstance(module, nn.Embedding):
            kind = "embedding"
        elif "norm" in type(module).__name__.lower():
            kind = "norm"
        elif pname == "bias" or pname.endswith("_bias"):
            kind = "bias"
        elif p.ndim < 2:
            kind = "norm" if re.search(r"norm|ln", full) else "bias"
        else:
            kind = "matrix"
        params.append(ParamInfo(full, int(p.numel()), kind, tuple(int(d) for d in p.shape)))
    return params


def _params_llama_layout(c: dict) -> list[ParamInfo]:
    V, H = int(c["vocab_size"]), int(c["hidden_size"])
    ffn = int(c.get("intermediate_size", 4 * H))
    L = int(c.get("num_hidden_layers", 1))
    nh = int(c.get("num_attention_heads", 1))
    nkv = int(c.get("num_key_value_heads") or nh)
    hd = int(c.get("head_dim") or H // nh)
    attn_bias, mlp_bias = bool(c.get("attention_bias", False)), bool(c.get("mlp_bias", False))
    P = [ParamInfo("model.embed_tokens.weight", V * H, "embedding", (V, H))]
    for i in range(L):
        pre = f"model.layers.{i}."
        for proj, (o, n) in {"q_proj": (nh * hd, H), "k_proj": (nkv * hd, H), "v_proj": (nkv * hd, H),
                             "o_proj": (H, nh * hd)}.items():
            P.append(ParamInfo(f"{pre}self_attn.{proj}.weight", o * n, "matrix", (o, n)))
            if attn_bias:
                P.append(ParamInfo(f"{pre}self_attn.{proj}.bias", o, "bias", (o,)))
        for proj, (o, n) in {"gate_proj": (ffn, H), "up_proj": (ffn, H), "down_proj": (H, ffn)}.items():
            P.append(ParamInfo(f"{pre}mlp.{proj}.weight", o * n, "matrix", (o, n)))
            if mlp_bias:
                P.append(ParamInfo(f"{pre}mlp.{proj}.bias", o, "bias", (o,)))
        P.append(ParamInfo(f"{pre}input_layernorm.weight", H, "norm", (H,)))
        P.append(ParamInfo(f"{pre}post_attention_layernorm.weight", H, "norm", (H,)))
    P.append(ParamInfo("model.norm.weight", H, "norm", (H,)))
    if not c.get("tie_word_embeddings", False):
        P.append(ParamInfo("lm_head.weight", V * H, "matrix", (V, H)))
    return P


def _decay_rule(run: _Run):
    """(decays(name, kind) -> bool, description of the grouping, whether it was assumed)."""
    raw = run.raw
    patterns = raw.get("no_decay")
    if isinstance(patterns, str):
        patterns = [patterns]
    if isinstance(patterns, (list, tuple)):
        regs = [re.compile(str(p)) for p in patterns]
        return (lambda name, kind: not any(r.search(name) for r in regs)), f"no_decay={list(patterns)!r}", False
    assumed = False
    if "no_decay_groups" in raw:
        groups = _truthy(raw["no_decay_groups"])
    elif "decay_norms_and_biases" in raw:
        groups = not _truthy(raw["decay_norms_and_biases"])
    else:
        groups = run.format == "hf"
        assumed = True
    decay_emb = _truthy(raw.get("decay_embeddings", True))
    hf_regs = [re.compile(p) for p in _HF_NO_DECAY_PATTERNS]

    def decays(name: str, kind: str) -> bool:
        if kind == "embedding" and not decay_emb:
            return False
        if groups and (kind in ("norm", "bias") or any(r.search(name) for r in hf_regs)):
            return False
        return True

    desc = ("norms and biases in a weight_decay=0 group" if groups else "every parameter decayed")
    desc += "" if decay_emb else ", embeddings not decayed"
    return decays, desc, assumed


# ---------------------------------------------------------------------------------------------- findings table
@dataclass(frozen=True)
class Variant:
    """Another form of the same finding kind: overrides the kind's severity, ``why`` or ``fix`` (None: keep)."""

    severity: str | None = None
    why: str | None = None
    fix: str | None = None


@dataclass(frozen=True)
class FindingKind:
    """One kind of finding, defined once: stable ``code``, default ``severity``, one-line ``title``, and the
    ``why`` / ``fix`` sentences (:meth:`str.format` templates the check fills with its numbers). ``variants`` name
    other forms of the same code (another severity or wording); ``notes`` are sentences a check may append to
    ``fix``."""

    code: str
    severity: str
    title: str
    why: str
    fix: str
    variants: dict[str, Variant] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)

    def __post_init__(self):
        for sev in (self.severity, *(v.severity for v in self.variants.values() if v.severity)):
            if sev not in SEVERITIES:
                raise ValueError(f"{self.code}: unknown severity {sev!r}")

    @property
    def severities(self) -> set[str]:
        return {self.severity} | {v.severity for v in self.variants.values() if v.severity}

    def make(self, message: str, data: dict | None = None, *, variant: str | None = None,
             notes: tuple[str, ...] = (), **params) -> Finding:
        v = self.variants[variant] if variant is not None else Variant()
        why = (v.why or self.why).format(**params)
        fix = (v.fix or self.fix).format(**params) + "".join(self.notes[n] for n in notes)
        return Finding(self.code, v.severity or self.severity, message, why, fix, dict(data or {}))


_EMA = ("AdamW's weights are an exponential moving average of its updates over the last ~τ steps (Wang & Aitchison, "
        "ICML 2025)")
_RUN_LENGTH_FIX = "Give `max_steps`, or `num_train_epochs` with `steps_per_epoch` (optimizer steps per epoch)."
_USE_ZERO_LOMO = "`optim: zeroadamw` with `rule: lomo|adalomo, step_in_backward: true`"

FINDINGS: dict[str, FindingKind] = {k.code: k for k in (
    FindingKind(
        "invalid-value", "error", "a value the optimizer would refuse",
        "The optimizer refuses this value (or the run is meaningless with it).",
        "Set a valid `{key}`."),
    FindingKind(
        "tau-too-short", "warn", "AdamW timescale shorter than about one epoch",
        _EMA + "; with τ under an epoch the model forgets most of each epoch before the next one, i.e. it averages "
        "over only part of the data.",
        "Lower weight_decay: {wd_range}.",
        variants={
            "run-fraction": Variant(why=_EMA + "; at the end of this run they average only the last "
                                    "{run_fraction:.1%} of it."),
            "zeroing": Variant("error", "Every step multiplies the weights by zero or a negative number: the model "
                                        "cannot learn."),
        },
        notes={
            "independent": " (decay='independent': λ is the per-step decay at the peak lr, so it is ~lr times "
                           "torch's λ.)",
            "independent-zeroing": " With decay='independent', λ is the per-step decay at the peak lr, not torch's "
                                   "λ: torch's 0.1 at lr 1e-4 is λ = 1e-5 here.",
        }),
    FindingKind(
        "tau-too-long", "warn", "AdamW timescale longer than the run",
        "With τ beyond the run the decay barely acts: the final weights still remember their initialisation (a "
        "factor ≈ exp(-run/τ) = {init_factor:.2f} of it at constant lr), so weight decay is not doing what it is "
        "there for; the best τ in epochs stays roughly constant as models and data scale (Wang & Aitchison, ICML "
        "2025). Fine-tuning may want the weights to stay near the pretrained ones, which a long τ does -- but then "
        "the decay is effectively off.",
        "Raise weight_decay: {wd_range}. Or, if staying near the initial weights is the point, set weight_decay to 0 "
        "and say so."),
    FindingKind(
        "tau-undefined", "info", "no weight decay: no timescale",
        "Nothing pulls the weights back; fine for short fine-tunes close to a pretrained model, but the regulariser "
        "AdamW is named for is off.",
        "If you want decay, pick τ between one epoch and the run: decoupled λ = 1/(lr·τ), independent λ = 1/τ."),
    FindingKind(
        "l2-with-adam", "warn", "L2 penalty through an adaptive optimizer",
        "The penalty's gradient λθ is divided by √v like any gradient: weights with large gradients are hardly "
        "regularised, and the best λ moves with the learning rate (Loshchilov & Hutter, ICLR 2019). There is no "
        "single decay timescale to reason with.",
        "Use decoupled decay: `decay: decoupled` (torch AdamW) or `decay: independent`, and retune λ (start from the "
        "τ band the doctor reports for it)."),
    FindingKind(
        "decay-on-norms-biases", "warn", "weight decay on norm gains and biases",
        "Norm gains and biases add almost no capacity, so decaying them does not regularise; it pulls "
        "RMSNorm/LayerNorm gains from 1 towards 0 (shrinking every activation the next layer sees) and biases "
        "towards 0, which the network has to fight every step.",
        "Put them in a group with weight_decay 0: `[{{'params': matrices, 'weight_decay': λ}}, {{'params': "
        "norms_and_biases, 'weight_decay': 0.0}}]` (HF Trainer does this), then set `no_decay_groups: true`."),
    FindingKind(
        "decay-on-embeddings", "info", "weight decay on embeddings",
        "An embedding row gets a gradient only when its token occurs, but is decayed every step: rare tokens' rows "
        "shrink towards 0 between occurrences (and, tied, so do their output logits). Many LLM recipes accept this; "
        "many exclude embeddings.",
        "To exclude them, add the embedding to the weight_decay=0 group and set `decay_embeddings: false`."),
    FindingKind(
        "decay-ignored", "warn", "weight_decay set but not passed to the optimizer",
        "The run is not regularised the way the config says.",
        f"Use {_USE_ZERO_LOMO} (decay honoured, with the three decay modes), or build lomo_optim yourself with "
        "`weight_decay=` and pass it to Trainer."),
    FindingKind(
        "warmup-missing", "warn", "no learning-rate warm-up",
        "Adam's first updates have size ≈ lr in every coordinate whatever the gradient scale (m/√v ≈ ±1), and √v "
        "rests on a handful of gradients; full-lr steps then can wreck a pretrained model or diverge. A linear "
        "warm-up over ~2/(1-β2) steps (Ma & Yarats, 2021) or a few % of the run damps this.",
        "Set `warmup_steps: {suggest}` (or a `warmup_ratio` of a few %) with a scheduler that warms up."),
    FindingKind(
        "warmup-too-long", "warn", "warm-up takes much of the run",
        "The lr only reaches its peak late: the run spends much of its budget at a lower lr than the one you tuned, "
        "and a decaying schedule has little room left.",
        "Use a warm-up of a few % of the run (e.g. {suggest} steps).",
        variants={"never": Variant("error", "The lr never reaches its peak: the warm-up is as long as the run, so "
                                            "all of it runs at a lower lr than the one you tuned.")}),
    FindingKind(
        "warmup-ignored", "warn", "warm-up set but the scheduler has none",
        "HF's get_scheduler builds 'constant', 'reduce_lr_on_plateau' and 'greedy' without the warm-up argument: "
        "the run starts at full lr.",
        "Use 'constant_with_warmup' (or 'linear' / 'cosine' / 'warmup_stable_decay')."),
    FindingKind(
        "beta2-too-long-for-run", "warn", "second-moment horizon 1/(1-beta2) long against the run",
        "v then averages over most of the run: it lags when the gradient scale changes (early training, loss "
        "spikes) — updates too small after gradients shrink, too large after they grow — and its bias correction "
        "dominates for much of the run.",
        "Lower β2 so that 1/(1-β2) is ≲ 10 % of the run (β2 ≈ {beta2:.3g}), or 0.95-0.98 as in LLM recipes."),
    FindingKind(
        "accumulation-unsupported", "error", "gradient accumulation the optimizer cannot honour",
        "LOMO updates each parameter inside backward; HF Trainer runs backward on every micro-batch, so every "
        "micro-batch is an update: {grad_accum} small steps instead of one accumulated one.",
        f"Set gradient_accumulation_steps to 1 (raise the batch size instead), or use {_USE_ZERO_LOMO}, which "
        "accumulates into a 1/N shard under `no_sync()` and updates once."),
    FindingKind(
        "clipping-unsupported", "error", "gradient clipping the optimizer cannot honour",
        "LOMO frees each gradient in backward after using it, so Trainer's clip_grad_norm_ afterwards finds no "
        "gradients: nothing is clipped. lomo_optim's own clipping needs a second backward pass (grad_norm(loss)), "
        "which Trainer does not run.",
        "Set `max_grad_norm: 0` and accept no clipping, or use `optim: zeroadamw` with `step_in_backward: true, "
        "max_grad_norm: ...`: exact global-norm clipping without a second backward."),
    FindingKind(
        "accumulation-needs-no-sync", "info", "fused step-in-backward accumulation needs no_sync()",
        "In the fused mode every backward outside `opt.no_sync()` updates the weights; only backward passes under "
        "`no_sync()` accumulate. A loop (or trainer) that does not wrap all but the last micro-batch in "
        "`no_sync()` makes an update per micro-batch.",
        "Wrap every micro-batch but the last in `with opt.no_sync():`, or set `max_grad_norm` (the update then "
        "waits for step())."),
    FindingKind(
        "fp16-fused-step-in-backward", "error", "fp16 loss scaling with fused step-in-backward",
        "The fused mode updates each bucket before the loss scale's inf check at step() is known; ShardedAdamW "
        "refuses this combination at the first step().",
        "Set `max_grad_norm` (the update then waits for step(), exact clipping, no second backward), or train in "
        "bf16 without a GradScaler."),
    FindingKind(
        "ddp-with-stage-2", "error", "DDP-reduced gradients with ZeRO stage 2",
        "Stage 2 and step-in-backward reduce gradients themselves in backward hooks; DDP would reduce them again, "
        "so ShardedAdamW refuses it.",
        "Drop DDP and `grads_reduced` (stage 2), or use `stage: 1, grads_reduced: true` to keep DDP."),
    FindingKind(
        "resume-without-optimizer-state", "error", "resuming without the optimizer state",
        "Adam restarts with m = v = 0 and step 1 on trained weights: the first updates are ±lr in every coordinate "
        "(bias correction on empty moments), a jolt the original run had damped with warm-up; the LR schedule may "
        "restart as well.",
        "Load the optimizer state (zeroadamw.checkpoint.load restores model, optimizer and scheduler unless told "
        "not to); with HF, save full checkpoints (save_only_model: false). If you must start fresh, add a warm-up."),
    FindingKind(
        "resume-data-not-skipped", "info", "resuming replays the data from the start",
        "The data loader starts the epoch from its first batch again: the batches seen before the checkpoint are "
        "seen twice and the rest of the epoch is cut short (the step counter continues).",
        "Leave ignore_data_skip false unless skipping is too slow for your dataset."),
    FindingKind(
        "independent-without-schedule-peak", "warn", "decay='independent' without a known schedule peak",
        "Independent decay is θ·(1 - λ·lr_t/lr_max): if lr_max is not the real peak, the decay is scaled by the "
        "wrong factor (above 1·λ per step when the lr rises above lr_max).",
        "Build the optimizer with lr = the schedule's peak and use a scheduler that scales it (LambdaLR, HF "
        "schedules, OneCycleLR), or set the group's `initial_lr` to the peak; give `lr_scheduler_type`."),
    FindingKind(
        "run-length-unknown", "info", "run length unknown",
        "τ should lie between about one epoch and the whole run; β2 and warm-up are judged against the run too.",
        _RUN_LENGTH_FIX,
        variants={"no-tau": Variant(why="Warm-up, β2 and the weight-decay timescale are judged against the run "
                                        "length.")}),
    FindingKind(
        "steps-per-epoch-unknown", "info", "epoch length unknown",
        "The lower end of the sensible range is one epoch: averaging over less than an epoch averages over only "
        "part of the data.",
        "Add `steps_per_epoch` (optimizer steps per epoch, after gradient accumulation), or `batches_per_epoch` "
        "(len(train_dataloader)), or `num_train_samples` + batch size + world_size."),
    FindingKind(
        "no-master-no-kahan", "warn", "low-precision weights updated without a master or Kahan compensation",
        "Each update is rounded to the weight's own precision: one smaller than half a {dtype} ulp of the weight "
        "({half_ulp:.2%} to {half_ulp2:.2%} of it) is lost, not accumulated. Adam's updates are at most about lr "
        "per element, so at lr {lr:.3g} any update to a weight above {lost_above:.2g} in magnitude that is no "
        "larger than lr rounds away -- and most of a fine-tune's are that small. The loss can look fine while "
        "the weights barely move.",
        "Set `kahan_sum: true` (with `master_dtype: null`): a {dtype} compensation buffer (2 B per param, sharded) "
        "keeps what the rounding drops, and the weights train like mixed precision; or drop `master_dtype: null` "
        "for the fp32 master (4 B per param).",
        variants={
            "adalomo": Variant(fix="Drop `master_dtype: null` for the fp32 master (kahan_sum is not implemented for "
                                   "adalomo)."),
            "torch": Variant(fix="Use `optim: zeroadamw` (ShardedAdamW keeps an fp32 master of bf16/fp16 params by "
                                 "default, or with `optim_args: master_dtype=none,kahan_sum=true` a 2-byte "
                                 "compensation instead), or load the model in fp32 and train under bf16 autocast."),
        }),
    FindingKind(
        "int8-small-tensors", "info", "int8 optimizer state: most trainable elements stay fp32",
        "ShardedAdamW quantizes only tensors of at least 4096 elements (bitsandbytes' min_8bit_size); smaller ones "
        "(norm gains, biases, the LoRA adapters of a narrow model) keep fp32 moments, 8 B per element instead of "
        "2.03, so the saving is smaller than state_dtype='int8' suggests.",
        "Expect {moment_bytes:.2f} B per trainable element for the moments, not 2.03 (`zeroadamw estimate` "
        "counts it per tensor); `state_dtype: bf16` stores every tensor at 4 B."),
    FindingKind(
        "bnb-8bit-with-sharding", "info", "bitsandbytes 8-bit optimizer on several ranks",
        "bitsandbytes keeps its 8-bit state per process, for whatever tensors it is handed: next to DDP every rank "
        "holds all of it; under DeepSpeed ZeRO or FSDP it quantizes the flat shards they hand it, so its blocks "
        "follow their cuts, not the parameters. ShardedAdamW's state_dtype='int8' is the same block-wise 8-bit "
        "Adam state (bitsandbytes' dynamic maps, 256-element blocks, fp32 under 4096 elements), sharded 1/N with "
        "blocks aligned to each parameter, so a checkpoint reshards to any world size.",
        "Use ShardedAdamW(..., state_dtype='int8'): HF `optim: zeroadamw` with `optim_args: state_dtype=int8` (or "
        "ZeroTrainer(zeroadamw=dict(state_dtype='int8'))); add `master_dtype=None, kahan_sum=True` to drop the "
        "fp32 master of bf16 weights too."),
)}
CODES: dict[str, str] = {code: kind.title for code, kind in FINDINGS.items()}
"""code -> one-line title of every finding kind (:data:`FINDINGS` has the rest)."""


def _finding(code: str, message: str, data: dict | None = None, **kw) -> Finding:
    return FINDINGS[code].make(message, data, **kw)


# ------------------------------------------------------------------------------------------------- context
@dataclass
class Timescale:
    """The AdamW timescale τ (steps, at the peak lr) and the band it is judged against."""

    tau: float
    per_step: float  # the per-step decay η·λ (decoupled) or λ (independent)
    epochs: float | None
    band: tuple[float, float] | None  # sensible τ, in steps
    multi_epoch: bool  # the run spans at least one known epoch
    short_limit: float | None  # tau-too-short below this
    long_limit: float | None  # tau-too-long above this
    what: str  # "τ = 1/(lr·λ) = ... steps = ... epochs"
    wd_range: str  # "weight_decay between ... puts τ between ..." ('' without a band)
    data: dict


@dataclass
class DecayGroups:
    """Which parameters get weight decay: the norms / biases and embeddings decayed, with the model or typical names."""

    norms_biases: list[ParamInfo]
    embeddings: list[ParamInfo]
    grouping: str  # how the groups are built, as told or assumed
    from_model: bool  # the names come from MODEL_CONFIG (else: typical Llama names, numel 0)
    tied: bool
    params: dict | None  # the summary's model counts (with MODEL_CONFIG)


_MOMENT_BYTES = {"fp32": 8.0, "fp64": 16.0, "bf16": 4.0, "fp16": 4.0, "int8": 2 + 8 / 256}  # both moments


@dataclass
class Precision:
    """The params' dtype, how ShardedAdamW stores the state (``state_dtype``, an fp32 master or ``kahan_sum``),
    whether the optimizer is a bitsandbytes 8-bit one, what shards the run, and the trainable tensors."""

    param_dtype: str | None  # "bf16" | "fp16" | "fp32" | "fp64"; None: the config does not say
    state_dtype: str | None  # None: automatic
    master: bool  # an fp32 master of bf16/fp16 params (ShardedAdamW's default)
    kahan: bool
    bnb_8bit: bool
    sharded_by: str | None  # "world_size 8", "DeepSpeed", "FSDP"; None: one process
    trainable: list[ParamInfo] | None  # with MODEL_CONFIG: its tensors, or the LoRA adapters
    trainable_what: str | None  # "full fine-tune" | "LoRA r=8 on q_proj,v_proj"

    @property
    def low_precision(self) -> bool:
        """bf16 / fp16 weights (or unknown: the options then matter as if they were)."""
        return self.param_dtype not in ("fp32", "fp64")

    def moments(self, param_dtype: str | None = None) -> str:
        """The moments' storage for params of ``param_dtype`` (default: theirs; bf16 when unknown), as
        ``zeroadamw.storage.moment_dtype`` picks it."""
        dt = param_dtype or self.param_dtype or "bf16"
        if self.state_dtype:
            return self.state_dtype
        if dt in ("fp32", "fp64"):
            return dt
        return "fp32" if self.master or self.kahan else dt

    def weights(self) -> str:
        if not self.low_precision:
            return f"{self.param_dtype} weights, no master needed"
        return ("fp32 master" if self.master else "Kahan compensation, no master" if self.kahan
                else "no master, no Kahan")

    def bytes_per_element(self) -> dict[str, float]:
        """Optimizer state per trainable element (/ N per rank with ZeRO), moments + master or compensation, for
        the params' dtype -- or, when the config does not say it, for bf16/fp16 and for fp32 params. Empty for a
        ``state_dtype`` ShardedAdamW refuses (an invalid-value finding)."""
        out: dict[str, float] = {}
        for dt in ([self.param_dtype] if self.param_dtype else ["bf16", "fp32"]):
            moments = _MOMENT_BYTES.get(self.moments(dt))
            if moments is None:
                return {}
            extra = (4 if self.master else 2 if self.kahan else 0) if dt in ("bf16", "fp16") else 0
            out["bf16/fp16" if self.param_dtype is None and dt == "bf16" else dt] = moments + extra
        return out


@dataclass
class Context:
    """What every check reads, built once per config by :func:`build_context`."""

    run: _Run
    hf_lomo: bool  # HF Trainer with lomo_optim (optim: lomo | adalomo)
    wd_effective: float  # the weight decay the optimizer really applies
    lr_peak: float  # the schedule's peak lr
    tau: Timescale | None
    groups: DecayGroups | None  # None when nothing is decayed
    resuming: bool
    no_opt_state: bool  # resuming without loading (or saving) the optimizer state
    fp16: bool
    step_in_backward: bool  # ours, fused or not
    precision: Precision | None = None

    @property
    def raw(self) -> dict:
        return self.run.raw


def _timescale(run: _Run, wd: float, lr_peak: float) -> Timescale | None:
    if not (wd > 0 and run.lr > 0 and run.decay in ("decoupled", "independent", "l2")):
        return None
    if run.decay == "l2" and run.adaptive:  # no single timescale (l2-with-adam)
        return None
    independent = run.decay == "independent"
    per_step = run.wd if independent else lr_peak * run.wd
    tau = 1.0 / per_step
    spe, total = run.steps_per_epoch, run.total_steps
    tau_ep = tau / spe if spe else None
    multi_epoch = spe is not None and total is not None and total >= spe
    band = short_limit = None
    if multi_epoch:
        band, short_limit = (spe, float(total)), spe / TAU_TOLERANCE
    elif total is not None:
        band, short_limit = (TAU_MIN_RUN_FRACTION * total, float(total)), TAU_MIN_RUN_FRACTION * total
    formula = "1/λ" if independent else "1/(lr·λ)"
    what = f"τ = {formula} = {_steps(tau)} steps" + (f" = {tau_ep:.3g} epochs" if tau_ep is not None else "")
    data = {"tau_steps": tau, "tau_epochs": tau_ep, "total_steps": total, "steps_per_epoch": spe,
            "decay": run.decay, "weight_decay": run.wd, "lr": lr_peak}
    wd_range = ""
    if band:
        def wd_for(t):  # the weight decay giving timescale t
            return 1.0 / t if independent else 1.0 / (lr_peak * t)

        lo_wd, hi_wd = wd_for(band[1]), wd_for(band[0])
        data["weight_decay_range"] = [lo_wd, hi_wd]
        unit = "1 epoch" if multi_epoch else f"{TAU_MIN_RUN_FRACTION:.0%} of the run"
        wd_range = (f"weight_decay between {_fmt(lo_wd)} and {_fmt(hi_wd)} puts τ between {unit} and the whole run "
                    f"({_steps(band[0])} to {_steps(band[1])} steps)")
    long_limit = TAU_TOLERANCE * total if total is not None else None
    return Timescale(tau, per_step, tau_ep, band, multi_epoch, short_limit, long_limit, what, wd_range, data)


_ASSUMED_GROUPING = ("; assumed, since the config does not say how param groups are built: set `no_decay_groups` / "
                     "`decay_embeddings`")


def _decay_groups(run: _Run, model_config: dict | None, plist: list[ParamInfo] | None) -> DecayGroups:
    decays, desc, assumed = _decay_rule(run)
    params = None
    if model_config is not None and plist is not None:
        dec = [p for p in plist if decays(p.name, p.kind)]
        params = {"total": sum(p.numel for p in plist), "decayed": sum(p.numel for p in dec),
                  "tensors": len(plist), "decayed_tensors": len(dec), "grouping": desc}
        nb = [p for p in dec if p.kind in ("norm", "bias")]
        emb = [p for p in dec if p.kind == "embedding"]
    else:
        nb = [ParamInfo(n, 0, k) for k in ("norm", "bias") for n in _TYPICAL[k] if decays(n, k)]
        emb = [ParamInfo(n, 0, "embedding") for n in _TYPICAL["embedding"] if decays(n, "embedding")]
    grouping = desc + (_ASSUMED_GROUPING if assumed else "")
    tied = bool(model_config and model_config.get("tie_word_embeddings"))
    return DecayGroups(nb, emb, grouping, model_config is not None, tied, params)


_DTYPES = {"bf16": "bf16", "bfloat16": "bf16", "fp16": "fp16", "float16": "fp16", "half": "fp16", "fp32": "fp32",
           "float32": "fp32", "float": "fp32", "fp64": "fp64", "float64": "fp64", "double": "fp64"}
_BNB_8BIT = re.compile(r"8[_-]?bit")  # adamw_bnb_8bit, paged_adamw_8bit, lion_8bit, AdamW8bit, bnb.optim.Adam8bit


def _sharded_by(raw: dict) -> str | None:
    """What runs the model on several ranks: DeepSpeed, FSDP, or ``world_size`` > 1 (None: one process)."""
    if _truthy(raw.get("deepspeed")) or isinstance(raw.get("zero_optimization"), dict):
        return "DeepSpeed"
    if _truthy(raw.get("fsdp")):
        return "FSDP"
    world = int(_num(raw.get("world_size"), 1) or 1)
    return f"world_size {world}" if world > 1 else None


def _lora_adapters(raw: dict, plist: list[ParamInfo]) -> tuple[list[ParamInfo], str]:
    """PEFT LoRA's lora_A [r, in] / lora_B [out, r] for the 2-D weights of the target modules (a name or a
    dotted suffix of the module's name; ``all-linear``: every matrix but the output layer)."""
    r = int(_num(raw.get("lora_r"), 0) or 0)
    targets = raw.get("lora_target_modules") or ["q_proj", "v_proj"]  # PEFT's default for Llama
    if isinstance(targets, str):
        targets = [x.strip() for x in targets.split(",") if x.strip()]
    targets = [str(x) for x in targets]
    out = []
    for p in plist:
        base, _, leaf = p.name.rpartition(".")
        if p.kind != "matrix" or len(p.shape) != 2 or leaf != "weight":
            continue
        if (targets == ["all-linear"] and p.name != "lm_head.weight") or any(
                base == x or base.endswith("." + x) for x in targets):
            o, i = p.shape
            out += [ParamInfo(f"{base}.lora_A.weight", r * i, "matrix", (r, i)),
                    ParamInfo(f"{base}.lora_B.weight", o * r, "matrix", (o, r))]
    return out, f"LoRA r={r} on {','.join(targets)}"


def _precision(run: _Run, plist: list[ParamInfo] | None) -> Precision:
    raw = run.raw
    dt = raw.get("param_dtype")
    dt = _DTYPES.get(str(dt).strip().lower().removeprefix("torch.")) if dt is not None else None
    sd, master, kahan = _precision_options(raw)
    trainable = what = None
    if plist is not None:
        trainable, what = plist, "full fine-tune"
        if _num(raw.get("lora_r"), 0):
            trainable, what = _lora_adapters(raw, trainable)
    return Precision(dt, sd, master, kahan, bool(_BNB_8BIT.search(run.optim)) and not run.zero, _sharded_by(raw),
                     trainable, what)


def build_context(config: dict, model_config: dict | None = None, *, use_transformers: bool = True) -> Context:
    """Normalise ``config`` and derive what the checks share (timescale, decayed params, resume state)."""
    run = _normalise(config)
    raw = run.raw
    hf_lomo = run.format == "hf" and not run.zero and run.optim in ("lomo", "adalomo")
    wd_effective = 0.0 if hf_lomo else run.wd  # Trainer passes only lr to lomo_optim (decay-ignored)
    lr_peak = _num(raw.get("lr_max")) or run.lr
    resuming = _truthy(raw.get("resume_from_checkpoint"))
    plist = None  # the model's tensors, for the decay groups and int8-small-tensors
    if model_config is not None and (wd_effective > 0 or _precision_options(raw)[0] == "int8"):
        plist = model_parameters(model_config, use_transformers=use_transformers)
    no_opt_state = resuming and (
        ("load_optimizer" in raw and not _truthy(raw["load_optimizer"]))
        or _truthy(raw.get("skip_optimizer_state")) or _truthy(raw.get("ignore_optimizer_state"))
        or _truthy(raw.get("save_only_model")))
    return Context(
        run=run, hf_lomo=hf_lomo, wd_effective=wd_effective, lr_peak=lr_peak,
        tau=_timescale(run, wd_effective, lr_peak),
        groups=_decay_groups(run, model_config, plist) if wd_effective > 0 else None,
        resuming=resuming, no_opt_state=no_opt_state,
        fp16=_truthy(raw.get("fp16")) or str(raw.get("mixed_precision", "")).lower() == "fp16",
        step_in_backward=run.zero and _truthy(raw.get("step_in_backward")),
        precision=_precision(run, plist))


# -------------------------------------------------------------------------------------------------- checks
# Each check reads the context and returns its findings (usually none or one); CHECKS runs them in order.
def check_invalid_values(ctx: Context) -> list[Finding]:
    return [_finding("invalid-value", f"{msg}.", {"key": key}, key=key) for key, msg in ctx.run.invalid]


_LOMO_CLASSES = {"lomo": "Lomo", "adalomo": "AdaLomo"}  # lomo_optim's class for HF's optim name


def check_decay_ignored(ctx: Context) -> list[Finding]:
    run = ctx.run
    if not (ctx.hf_lomo and run.wd > 0):
        return []
    return [_finding(
        "decay-ignored", f"weight_decay = {run.wd} with optim '{run.optim}': HF Trainer builds lomo_optim's "
        f"{_LOMO_CLASSES[run.optim]} from the model and `lr` only, so the optimizer runs with its default weight_decay = 0.",
        {"weight_decay": run.wd})]


def check_l2_with_adam(ctx: Context) -> list[Finding]:
    run = ctx.run
    if not (ctx.wd_effective > 0 and run.lr > 0 and run.decay == "l2" and run.adaptive):
        return []
    return [_finding(
        "l2-with-adam", f"weight decay is an L2 penalty (decay='l2', λ = {run.wd}) through an adaptive optimizer "
        f"({run.optim}{'' if not run.zero else ', rule ' + run.rule}).", {"weight_decay": run.wd})]


def check_timescale(ctx: Context) -> list[Finding]:
    """tau-too-short (error when the per-step factor 1 - η·λ is <= 0) or tau-too-long."""
    t, run = ctx.tau, ctx.run
    if t is None:
        return []
    total, spe = run.total_steps, run.steps_per_epoch
    independent = run.decay == "independent"
    if t.per_step >= 1.0:
        return [_finding("tau-too-short", f"{t.what}: the per-step decay factor {1 - t.per_step:.3g} is ≤ 0.", t.data,
                         variant="zeroing", notes=("independent-zeroing",) if independent else (),
                         wd_range=t.wd_range or "λ·lr must be far below 1")]
    if t.short_limit is not None and t.tau < t.short_limit:
        if t.multi_epoch:
            variant, where = None, f"shorter than about one epoch ({_steps(spe)} steps)"
        else:
            variant, where = "run-fraction", f"under {TAU_MIN_RUN_FRACTION:.0%} of the {_steps(total)}-step run"
        return [_finding("tau-too-short", f"{t.what}: {where}.", t.data, variant=variant,
                         notes=("independent",) if independent else (), wd_range=t.wd_range,
                         run_fraction=t.tau / total)]
    if t.long_limit is not None and t.tau > t.long_limit:
        epochs = f" ({total / spe:.3g} epochs)" if spe else ""
        return [_finding("tau-too-long", f"{t.what}: {t.tau / total:.3g}x the {_steps(total)}-step run{epochs}.",
                         t.data, wd_range=t.wd_range, init_factor=math.exp(-total / t.tau))]
    return []


def check_tau_undefined(ctx: Context) -> list[Finding]:
    run = ctx.run
    if not (run.wd == 0 and run.lr > 0):
        return []
    return [_finding("tau-undefined", "weight_decay = 0: no weight decay, so no AdamW timescale.")]


def check_run_length(ctx: Context) -> list[Finding]:
    """run-length-unknown, or steps-per-epoch-unknown when only the epoch length (needed for τ) is missing."""
    t, run = ctx.tau, ctx.run
    if run.total_steps is None:
        if t is not None:
            return [_finding("run-length-unknown",
                             f"{t.what}; the run length is unknown, so τ is not compared with it.", t.data)]
        return [_finding("run-length-unknown", "The run length is unknown (no `max_steps`, or no epochs × steps "
                         "per epoch).", variant="no-tau")]
    if t is not None and run.steps_per_epoch is None:
        return [_finding("steps-per-epoch-unknown", f"{t.what}; steps per epoch unknown, so τ cannot be put in "
                         "epochs (only compared with the run).", t.data)]
    return []


def check_decay_on_norms_biases(ctx: Context) -> list[Finding]:
    g = ctx.groups
    if g is None or not g.norms_biases:
        return []
    nb = g.norms_biases
    what = " and ".join({"norm": "norm gains", "bias": "biases"}[k] for k in sorted({p.kind for p in nb}))
    elements = sum(p.numel for p in nb)
    if g.from_model:
        ex = ", ".join(p.name for p in nb[:3]) + (", ..." if len(nb) > 3 else "")
        count = f": {len(nb)} tensors, {elements:,} elements ({ex})"
    else:
        count = f" (grouping: {g.grouping})"
    return [_finding("decay-on-norms-biases", f"Weight decay λ = {ctx.run.wd} is applied to {what}{count}.",
                     {"params": [p.name for p in nb][:50], "elements": elements})]


def check_decay_on_embeddings(ctx: Context) -> list[Finding]:
    g = ctx.groups
    if g is None or not g.embeddings:
        return []
    emb = g.embeddings
    elements = sum(p.numel for p in emb)
    if g.from_model:
        count = (f": {', '.join(p.name for p in emb)} ({elements:,} elements"
                 + (", tied to the output layer)" if g.tied else ")"))
    else:
        count = f" (grouping: {g.grouping})"
    return [_finding("decay-on-embeddings", f"Weight decay λ = {ctx.run.wd} is applied to the embeddings{count}.",
                     {"params": [p.name for p in emb], "elements": elements})]


def suggested_warmup_steps(beta2: float, rule: str = "adamw", total_steps: int | None = None) -> int:
    """~2/(1-β2) steps for Adam (Ma & Yarats, 2021), 100 for the other rules; at most 10 % of a known run."""
    horizon = 1.0 / (1.0 - beta2) if beta2 < 1 else math.inf
    suggest = 2 * horizon if rule == "adamw" else 100
    if total_steps:
        suggest = min(suggest, max(1, round(0.1 * total_steps)))
    if math.isinf(suggest):  # β2 >= 1 (reported as invalid-value) and no run length to bound it
        suggest = 100
    # round(), not int(): 2/(1-0.999) is 1999.9999999999982 in floating point (1 - 0.999 = 0.0010000000000000009),
    # which int() truncates to 1999. The formula means "about this many steps", so the nearest whole step is the
    # answer for any β2 (2000 for 0.999, 40 for 0.95, 667 for 0.997); round() absorbs a float error of either sign,
    # where ceil() would turn 2000.0000000001 into 2001.
    return int(round(suggest))


def check_warmup_missing(ctx: Context) -> list[Finding]:
    run = ctx.run
    if not (run.adaptive and run.warmup == 0 and (not ctx.resuming or ctx.no_opt_state) and run.lr > 0):
        return []
    suggest = suggested_warmup_steps(run.beta2, run.rule, run.total_steps)
    return [_finding("warmup-missing", f"No learning-rate warm-up ({run.optim}"
                     f"{', rule ' + run.rule if run.zero else ''}, lr {_fmt(run.lr)} from step 1).",
                     {"suggested_warmup_steps": suggest}, suggest=suggest)]


def check_warmup_ignored(ctx: Context) -> list[Finding]:
    run = ctx.run
    if not (run.warmup != 0 and run.scheduler in _NO_WARMUP_SCHEDULES):
        return []
    return [_finding("warmup-ignored", f"Warm-up is set, but lr_scheduler_type '{run.scheduler}' has no warm-up.",
                     {"scheduler": run.scheduler})]


def check_warmup_too_long(ctx: Context) -> list[Finding]:
    run, total = ctx.run, ctx.run.total_steps
    if not (total and run.warmup > 0 and run.warmup > WARMUP_MAX_FRACTION * total):
        return []
    return [_finding(
        "warmup-too-long", f"Warm-up is {_steps(run.warmup)} of {_steps(total)} steps ({run.warmup / total:.0%} of "
        "the run).", {"warmup_steps": run.warmup, "total_steps": total},
        variant="never" if run.warmup >= total else None, suggest=max(1, round(0.05 * total)))]


def check_beta2_horizon(ctx: Context) -> list[Finding]:
    run, total = ctx.run, ctx.run.total_steps
    if not (run.rule == "adamw" and total and run.beta2 < 1):
        return []
    horizon = 1.0 / (1.0 - run.beta2)
    if horizon <= BETA2_MAX_RUN_FRACTION * total:
        return []
    return [_finding(
        "beta2-too-long-for-run", f"β2 = {run.beta2}: the second-moment average spans 1/(1-β2) = {_steps(horizon)} "
        f"steps, {horizon / total:.0%} of the {_steps(total)}-step run.",
        {"beta2": run.beta2, "horizon_steps": horizon, "total_steps": total}, beta2=max(1.0 - 10.0 / total, 0.5))]


def check_lomo_accumulation(ctx: Context) -> list[Finding]:
    run = ctx.run
    if not (ctx.hf_lomo and run.grad_accum > 1):
        return []
    return [_finding("accumulation-unsupported",
                     f"gradient_accumulation_steps = {run.grad_accum} with optim '{run.optim}' (lomo_optim).",
                     {"gradient_accumulation_steps": run.grad_accum}, grad_accum=run.grad_accum)]


def check_lomo_clipping(ctx: Context) -> list[Finding]:
    run = ctx.run
    if not (ctx.hf_lomo and run.max_grad_norm is not None):
        return []
    return [_finding("clipping-unsupported", f"max_grad_norm = {run.max_grad_norm} with optim '{run.optim}' "
                     "(lomo_optim).", {"max_grad_norm": run.max_grad_norm})]


def check_fp16_fused_step_in_backward(ctx: Context) -> list[Finding]:
    if not (ctx.step_in_backward and ctx.run.max_grad_norm is None and ctx.fp16):
        return []
    return [_finding("fp16-fused-step-in-backward", "step_in_backward without max_grad_norm (fused: updates during "
                     "backward) with fp16 loss scaling.")]


def check_fused_accumulation(ctx: Context) -> list[Finding]:
    run = ctx.run
    if not (ctx.step_in_backward and run.max_grad_norm is None and run.grad_accum > 1):
        return []
    return [_finding("accumulation-needs-no-sync",
                     f"gradient_accumulation_steps = {run.grad_accum} with fused step_in_backward.",
                     {"gradient_accumulation_steps": run.grad_accum})]


def check_ddp_with_stage_2(ctx: Context) -> list[Finding]:
    if not (ctx.run.zero and _truthy(ctx.raw.get("grads_reduced"))
            and (ctx.raw.get("stage", 2) == 2 or ctx.step_in_backward)):
        return []
    return [_finding("ddp-with-stage-2", "grads_reduced (a DDP-wrapped model) with stage 2 / step_in_backward.")]


def check_resume_optimizer_state(ctx: Context) -> list[Finding]:
    if not (ctx.resuming and ctx.no_opt_state):
        return []
    reason = ("the checkpoints are saved with save_only_model: true (no optimizer or scheduler state)"
              if _truthy(ctx.raw.get("save_only_model")) else "the optimizer state is not loaded")
    return [_finding("resume-without-optimizer-state",
                     f"resume_from_checkpoint = {ctx.raw.get('resume_from_checkpoint')!r}, but {reason}.")]


def check_resume_data_skip(ctx: Context) -> list[Finding]:
    if not (ctx.resuming and _truthy(ctx.raw.get("ignore_data_skip"))):
        return []
    return [_finding("resume-data-not-skipped", "Resuming with ignore_data_skip: true.")]


def check_independent_schedule_peak(ctx: Context) -> list[Finding]:
    run = ctx.run
    if not (run.decay == "independent" and run.wd > 0):
        return []
    peak, sched = _num(ctx.raw.get("lr_max")), run.scheduler
    if (peak is not None and not math.isclose(peak, run.lr, rel_tol=1e-9)
            and sched not in ("one_cycle", "onecycle")):
        reason = (f"the schedule's peak lr {peak} differs from the optimizer's lr {run.lr}; ShardedAdamW divides by "
                  "the group's initial_lr (OneCycleLR's max_lr when present)")
    elif sched is None:
        reason = "no lr_scheduler_type is given, so the schedule's peak is unknown"
    elif sched not in _KNOWN_SCHEDULES:
        reason = (f"lr_scheduler_type '{sched}' is unknown to the doctor; its peak may not be the lr the optimizer "
                  "was built with")
    else:
        return []
    return [_finding("independent-without-schedule-peak", f"decay='independent' but {reason}.",
                     {"lr": run.lr, "lr_max": peak, "scheduler": sched})]


_HALF_ULP = {"bf16": 2.0**-9, "fp16": 2.0**-12}  # an update below this fraction of |w| may round away


def check_no_master_no_kahan(ctx: Context) -> list[Finding]:
    """bf16/fp16 weights updated in their own dtype: ours with master_dtype=None and no Kahan, or torch AdamW on
    weights loaded in bf16/fp16."""
    p, run = ctx.precision, ctx.run
    if p is None or run.lr <= 0:
        return []
    if run.zero and not p.master and not p.kahan and p.low_precision:
        variant = "adalomo" if run.rule == "adalomo" else None
        what = "master_dtype=None without kahan_sum"
    elif not run.zero and p.param_dtype in _HALF_ULP and run.optim.startswith("adam") and not p.bnb_8bit \
            and "anyprecision" not in run.optim:  # torch AdamW / Adam (AnyPrecisionAdamW has its own Kahan)
        variant, what = "torch", f"optim '{run.optim}' (torch AdamW, no master copy)"
    else:
        return []
    dtype = p.param_dtype or "bf16"
    half = _HALF_ULP[dtype]
    known = "" if p.param_dtype else " (the config does not say the params' dtype: if they are bf16; set `param_dtype`)"
    # |w| >= lr / half: the half ulp of w (2**-8 to 2**-9 of |w| for bf16) exceeds lr, so an update of lr rounds away
    return [_finding("no-master-no-kahan", f"{what}: {dtype} weights are updated in {dtype}{known}.",
                     {"param_dtype": p.param_dtype, "lr": run.lr, "lost_above": run.lr / half},
                     variant=variant, dtype=dtype, half_ulp=half, half_ulp2=2 * half, lr=run.lr,
                     lost_above=run.lr / half)]


def check_int8_small_tensors(ctx: Context) -> list[Finding]:
    p = ctx.precision
    if not (ctx.run.zero and p is not None and p.state_dtype == "int8" and p.trainable):
        return []
    total = sum(x.numel for x in p.trainable)
    small = [x for x in p.trainable if x.numel < INT8_MIN_NUMEL]
    frac = sum(x.numel for x in small) / total if total else 0.0
    if frac < INT8_FP32_FRACTION:
        return []
    per = (1 - frac) * _MOMENT_BYTES["int8"] + frac * _MOMENT_BYTES["fp32"]
    return [_finding(
        "int8-small-tensors", f"state_dtype='int8' ({p.trainable_what}): {len(small):,} of {len(p.trainable):,} "
        f"trainable tensors, {frac:.0%} of the {total:,} trainable elements, have fewer than {INT8_MIN_NUMEL:,} "
        "elements and keep fp32 moments.",
        {"fp32_fraction": frac, "small_tensors": len(small), "tensors": len(p.trainable), "elements": total,
         "moment_bytes_per_element": per}, moment_bytes=per)]


def check_bnb_8bit_with_sharding(ctx: Context) -> list[Finding]:
    p = ctx.precision
    if p is None or not (p.bnb_8bit and p.sharded_by):
        return []
    return [_finding("bnb-8bit-with-sharding", f"optim '{ctx.run.optim}' (bitsandbytes 8-bit) with {p.sharded_by}.",
                     {"optim": ctx.run.optim, "sharded_by": p.sharded_by})]


CHECKS = [
    check_invalid_values,
    check_decay_ignored,
    check_l2_with_adam,
    check_timescale,
    check_tau_undefined,
    check_run_length,
    check_decay_on_norms_biases,
    check_decay_on_embeddings,
    check_warmup_missing,
    check_warmup_ignored,
    check_warmup_too_long,
    check_beta2_horizon,
    check_lomo_accumulation,
    check_lomo_clipping,
    check_fp16_fused_step_in_backward,
    check_fused_accumulation,
    check_ddp_with_stage_2,
    check_resume_optimizer_state,
    check_resume_data_skip,
    check_independent_schedule_peak,
    check_no_master_no_kahan,
    check_int8_small_tensors,
    check_bnb_8bit_with_sharding,
]
"""The checks :func:`summarize` runs, in order (the findings are then sorted, errors first, stably)."""

_SEVERITY_ORDER = {"error": 0, "warn": 1, "info": 2}


def diagnose(config: dict, model_config: dict | None = None, *, use_transformers: bool = True) -> list[Finding]:
    """Check a training config (HF TrainingArguments-style dict or our launch flags; see the module docstring)
    and, optionally, the model's ``config.json``. Returns the findings, errors first."""
    return summarize(config, model_config, use_transformers=use_transformers)[0]


def summarize(config: dict, model_config: dict | None = None, *,
              use_transformers: bool = True) -> tuple[list[Finding], dict]:
    """:func:`diagnose` plus the summary the CLI prints (timescale, run length, parameter counts...)."""
    if not isinstance(config, dict):
        raise TypeError(f"config must be a dict, got {type(config).__name__}")
    ctx = build_context(config, model_config, use_transformers=use_transformers)
    findings = [f for check in CHECKS for f in check(ctx)]
    findings.sort(key=lambda f: _SEVERITY_ORDER[f.severity])
    return findings, _summary(ctx, findings)


def _summary(ctx: Context, findings: list[Finding]) -> dict:
    run, t = ctx.run, ctx.tau
    spe, total = run.steps_per_epoch, run.total_steps
    summary = {
        "format": run.format,
        "optimizer": run.optim,
        "rule": run.rule,
        "decay": run.decay,
        "learning_rate": run.lr,
        "lr_max": ctx.lr_peak,
        "weight_decay": run.wd,
        "betas": [run.beta1, run.beta2],
        "eps": run.eps,
        "total_steps": total,
        "steps_per_epoch": spe,
        "run_epochs": (total / spe) if (total and spe) else None,
        "warmup_steps": run.warmup if run.warmup >= 0 else None,
        "gradient_accumulation_steps": run.grad_accum,
        "max_grad_norm": run.max_grad_norm,
        "tau_steps": t.tau if t else None,
        "tau_epochs": t.epochs if t else None,
        "tau_band_steps": list(t.band) if t and t.band else None,
        "beta2_horizon_steps": (1.0 / (1.0 - run.beta2)) if run.beta2 < 1 else None,
        "params": ctx.groups.params if ctx.groups else None,
        "precision": _precision_summary(ctx),
        "assumed": run.assumed,
        "counts": {s: sum(f.severity == s for f in findings) for s in SEVERITIES},
    }
    return _jsonable(summary)


def _precision_summary(ctx: Context) -> dict | None:
    """ShardedAdamW's state storage (``optim: zeroadamw``), else the params' dtype and a bitsandbytes 8-bit flag."""
    p = ctx.precision
    if p is None:
        return None
    if not ctx.run.zero:
        return {"param_dtype": p.param_dtype, "bitsandbytes_8bit": p.bnb_8bit} if p.param_dtype or p.bnb_8bit else None
    return {"param_dtype": p.param_dtype, "state_dtype": p.state_dtype, "moments": p.moments(),
            "master_dtype": "fp32" if p.master and p.low_precision else None, "kahan_sum": p.kahan,
            "weights": p.weights(), "state_bytes_per_element": p.bytes_per_element(), "trainable": p.trainable_what}


# ----------------------------------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", metavar="CONFIG",
                        help="training config: HF TrainingArguments-style JSON, our launch flags as JSON, or a file "
                             "of --flag value pairs ('-' = stdin)")
    parser.add_argument("--model", metavar="MODEL_CONFIG", default=None,
                        help="the model's HF config.json: name the params that get weight decay")
    parser.add_argument("--json", action="store_true", help='print {"findings": [...], "summary": {...}}')
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = (
        "keys worth adding to an HF config: steps_per_epoch (optimizer steps per epoch; or batches_per_epoch, or\n"
        "num_train_samples + per_device_train_batch_size + world_size) -- without a run length the timescale and\n"
        "run-length checks stay silent; no_decay_groups, decay_embeddings, no_decay (which params get decay).\n"
        "Every key, each finding code and its fix: the module docstring of zeroadamw.doctor\n"
        "(python -c 'import zeroadamw.doctor as d; help(d)').\n\n"
        "example: zeroadamw doctor args.json --model config.json\n\n"
        "exit status: 0 no error-severity finding, 1 at least one, 2 unreadable input")


def _human(findings: list[Finding], summary: dict, path: str) -> str:
    s = summary
    fmt = {"hf": "HF TrainingArguments", "flags": "launch flags"}[s["format"]]
    lines = [f"zeroadamw doctor: {path} ({fmt})"]
    lines.append(f"  optimizer {s['optimizer']}" + (f" (rule {s['rule']})" if s["optimizer"] == "zeroadamw" else "")
                 + f", decay={s['decay']}, lr {_fmt(s['learning_rate'])}, weight_decay {_fmt(s['weight_decay'])}, "
                 f"betas ({s['betas'][0]}, {s['betas'][1]}), eps {_fmt(s['eps'])}")
    run = "run: " + (f"{_steps(s['total_steps'])} steps" if s["total_steps"] else "length unknown")
    if s["run_epochs"]:
        run += f" = {s['run_epochs']:.3g} epochs of {_steps(s['steps_per_epoch'])} steps"
    if s["warmup_steps"] is not None:
        run += f"; warm-up {_steps(s['warmup_steps'])} steps"
    lines.append("  " + run)
    if s["tau_steps"] is not None:
        t = f"  timescale τ = {_steps(s['tau_steps'])} steps"
        if s["tau_epochs"] is not None:
            t += f" = {s['tau_epochs']:.3g} epochs"
        if s["tau_band_steps"]:
            t += f" (sensible: {_steps(s['tau_band_steps'][0])} to {_steps(s['tau_band_steps'][1])} steps)"
        lines.append(t)
    if s["params"]:
        p = s["params"]
        lines.append(f"  model: {p['total']:,} params, {p['decayed']:,} decayed ({p['grouping']})")
    pr = s.get("precision")
    if pr and "moments" in pr and pr["state_bytes_per_element"]:
        small = f" (tensors under {INT8_MIN_NUMEL} elements: fp32)" if pr["moments"] == "int8" else ""
        per = ", ".join(f"{v:.3g} B for {k} params" for k, v in pr["state_bytes_per_element"].items())
        lines.append(f"  state: {pr['moments']} moments{small}, {pr['weights']}; per trainable element {per} "
                     "(/ N per rank)")
    if s["assumed"]:
        lines.append("  assumed defaults: " + ", ".join(s["assumed"]))
    lines.append("")
    for f in findings:
        lines.append(f"{f.severity.upper():5s} {f.code}")
        for label, text in (("", f.message), ("why: ", f.why), ("fix: ", f.fix)):
            lines.append(textwrap.fill(label + text, width=110, initial_indent="      ",
                                       subsequent_indent="      " + " " * len(label), break_on_hyphens=False))
        lines.append("")
    c = s["counts"]
    if not findings:
        lines.append("no findings.")
    lines.append(f"{c['error']} error(s), {c['warn']} warning(s), {c['info']} note(s)")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config)
        model_config = None
        if args.model:
            with open(args.model, encoding="utf-8") as fh:
                model_config = json.load(fh)
            if not isinstance(model_config, dict):
                raise ValueError("MODEL_CONFIG must be a JSON object")
    except (OSError, ValueError) as e:
        print(f"zeroadamw doctor: cannot read input: {e}", file=sys.stderr)
        return 2
    findings, summary = summarize(config, model_config)
    if args.json:
        print(json.dumps({"findings": [f.to_dict() for f in findings], "summary": summary}, indent=2,
                         ensure_ascii=False))
    else:
        print(_human(findings, summary, args.config))
    return 1 if any(f.severity == "error" for f in findings) else 0

def main(argv: list[str] | None = None) -> int:
    """``python -m zeroadamw.doctor ...`` = ``zeroadamw doctor ...`` (same help, exit codes, quiet broken pipe)."""
    from .cli import main as cli_main

    return cli_main(["doctor", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
