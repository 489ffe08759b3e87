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
  ``summary.assumed``).
* **Launch flags** of ours (ShardedAdamW's names; missing keys take ShardedAdamW's defaults): ``lr``,
  ``weight_decay``, ``betas`` (or ``beta1``/``beta2``), ``eps``, ``decay`` (``decoupled`` | ``independent`` |
  ``l2``), ``stage``, ``step_in_backward``, ``rule`` (``adamw`` | ``lomo`` | ``adalomo``), ``max_grad_norm``,
  ``grads_reduced``, ``steps`` / ``max_steps``, ``epochs``, ``warmup_steps``, ``lr_scheduler_type``,
  ``grad_accum``.

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
* **Other.** ``fp16``, ``world_size``, ``lr_max`` / ``peak_lr`` (the schedule's peak when it is not ``lr``).

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
from typing import Any

__all__ = ["Finding", "CODES", "diagnose", "summarize", "model_parameters", "load_config", "add_arguments", "run"]

SEVERITIES = ("info", "warn", "error")

CODES: dict[str, str] = {
    "invalid-value": "a value the optimizer would refuse",
    "tau-too-short": "AdamW timescale shorter than about one epoch",
    "tau-too-long": "AdamW timescale longer than the run",
    "tau-undefined": "no weight decay: no timescale",
    "l2-with-adam": "L2 penalty through an adaptive optimizer",
    "decay-on-norms-biases": "weight decay on norm gains and biases",
    "decay-on-embeddings": "weight decay on embeddings",
    "decay-ignored": "weight_decay set but not passed to the optimizer",
    "warmup-missing": "no learning-rate warm-up",
    "warmup-too-long": "warm-up takes much of the run",
    "warmup-ignored": "warm-up set but the scheduler has none",
    "beta2-too-long-for-run": "second-moment horizon 1/(1-beta2) long against the run",
    "accumulation-unsupported": "gradient accumulation the optimizer cannot honour",
    "clipping-unsupported": "gradient clipping the optimizer cannot honour",
    "accumulation-needs-no-sync": "fused step-in-backward accumulation needs no_sync()",
    "fp16-fused-step-in-backward": "fp16 loss scaling with fused step-in-backward",
    "ddp-with-stage-2": "DDP-reduced gradients with ZeRO stage 2",
    "resume-without-optimizer-state": "resuming without the optimizer state",
    "resume-data-not-skipped": "resuming replays the data from the start",
    "independent-without-schedule-peak": "decay='independent' without a known schedule peak",
    "run-length-unknown": "run length unknown",
    "steps-per-epoch-unknown": "epoch length unknown",
}

TAU_TOLERANCE = 2.0
""""About one epoch to the whole run": tau-too-short below 1/2 epoch, tau-too-long above 2x the run."""
TAU_MIN_RUN_FRACTION = 0.02
"""Runs of at most one epoch (or of unknown epoch length): tau-too-short below this fraction of the run."""
WARMUP_MAX_FRACTION = 0.25
"""warmup-too-long above this fraction of the run."""
BETA2_MAX_RUN_FRACTION = 0.25
"""beta2-too-long-for-run when 1/(1-beta2) exceeds this fraction of the run."""

# HF TrainingArguments defaults (transformers 4.46 - 5.x) for the keys the doctor reads
HF_DEFAULTS: dict[str, Any] = {
    "learning_rate": 5e-5, "weight_decay": 0.0, "adam_beta1": 0.9, "adam_beta2": 0.999, "adam_epsilon": 1e-8,
    "num_train_epochs": 3.0, "max_steps": -1, "warmup_steps": 0, "warmup_ratio": 0.0, "lr_scheduler_type": "linear",
    "gradient_accumulation_steps": 1, "max_grad_norm": 1.0, "optim": "adamw_torch",
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
}
# keys only a TrainingArguments-style config has (any of them -> the HF form)
_HF_MARKERS = ("output_dir", "per_device_train_batch_size", "adam_beta1", "adam_beta2", "adam_epsilon",
               "num_train_epochs", "optim", "optim_args", "learning_rate", "warmup_ratio",
               "save_strategy", "logging_steps", "resume_from_checkpoint", "save_only_model", "ignore_data_skip")
# keys only ShardedAdamW has: with the HF form and no `optim`, they mean optim=zeroadamw
_OURS_MARKERS = ("decay", "stage", "step_in_backward", "rule", "grads_reduced")

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


def _normalise(cfg: dict) -> _Run:
    raw = _flatten(cfg)
    fmt = str(raw.get("format", "")).lower()
    if fmt not in ("hf", "flags"):
        keys = set(cfg)
        if isinstance(cfg.get("training_args"), dict):
            keys |= {str(k) for k in cfg["training_args"]}
        fmt = "hf" if "training_args" in cfg or keys & set(_HF_MARKERS) else "flags"
    defaults = HF_DEFAULTS if fmt == "hf" else FLAG_DEFAULTS
    assumed: list[str] = []
    invalid: list[tuple[str, str]] = []

    def get(key):
        if key in raw and raw[key] is not None:
            return raw[key]
        if key in defaults:
            if defaults[key] is not None:
                assumed.append(f"{key}={defaults[key]!r}")
            return defaults[key]
        return None

    if "optim" not in raw and fmt == "hf" and any(k in raw for k in _OURS_MARKERS):
        raw["optim"] = "zeroadamw"
    optim = str(get("optim") or ("zeroadamw" if fmt == "flags" else "adamw_torch")).lower()
    zero = optim in ("zeroadamw", "shardedadamw", "sharded_adamw", "zero_adamw")
    if zero:
        rule = str(raw.get("rule") or "adamw").lower()
        decay = str(raw.get("decay") or "decoupled").lower()
        if "decay" not in raw:
            assumed.append("decay='decoupled'")
        if rule not in ("adamw", "lomo", "adalomo"):
            invalid.append(("rule", f"rule={rule!r} is not one of adamw, lomo, adalomo"))
    else:
        rule = ("lomo" if optim == "lomo" else "adalomo" if optim == "adalomo" else
                "sgd" if optim.startswith("sgd") else "adafactor" if "adafactor" in optim else "adamw")
        if optim in _ADAPTIVE_L2 or optim.startswith(("adagrad", "rmsprop", "sgd")):
            decay = "l2"  # torch's weight_decay for these is an L2 term added to the gradient
        else:
            decay = "decoupled"  # adamw_*, adafactor, lomo_optim's Lomo/AdaLomo: theta *= 1 - lr * wd
    adaptive = rule not in ("lomo", "sgd")

    lr = _num(get("learning_rate"), 0.0)
    wd = _num(get("weight_decay"), 0.0)
    beta1 = _num(get("adam_beta1"), 0.9)
    beta2 = _num(get("adam_beta2"), 0.999)
    eps = _num(get("adam_epsilon"), 1e-8)
    ga = int(_num(get("gradient_accumulation_steps"), 1) or 1)
    mgn = _num(get("max_grad_norm"))
    mgn = mgn if mgn is not None and mgn > 0 else None

    if not lr > 0:
        invalid.append(("learning_rate", f"learning rate {lr} is not > 0"))
    if wd < 0:
        invalid.append(("weight_decay", f"weight_decay {wd} is negative"))
    for name, b in (("adam_beta1", beta1), ("adam_beta2", beta2)):
        if not 0.0 <= b < 1.0:
            invalid.append((name, f"{name} = {b} is outside [0, 1)"))
    if eps < 0:
        invalid.append(("adam_epsilon", f"epsilon {eps} is negative"))
    if decay not in ("decoupled", "independent", "l2"):
        invalid.append(("decay", f"decay={decay!r} is not one of decoupled, independent, l2"))
    if ga < 1:
        invalid.append(("gradient_accumulation_steps", f"gradient_accumulation_steps = {ga} is < 1"))
        ga = 1
    if zero:
        stage = raw.get("stage", 2)
        if stage not in (1, 2) or isinstance(stage, bool):
            invalid.append(("stage", f"stage={stage!r} is not 1 or 2"))
        if _truthy(raw.get("step_in_backward")) and stage == 1:
            invalid.append(("stage", "step_in_backward needs stage=2 (it reduces and updates during backward)"))

    # run length, in optimizer steps
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
    max_steps = _num(raw.get("max_steps"))
    total: int | None = None
    if max_steps is not None and max_steps > 0:
        total = int(max_steps)
    else:
        epochs = _num(get("num_train_epochs")) if fmt == "hf" else _num(raw.get("num_train_epochs"))
        if epochs is not None and epochs > 0 and spe is not None:
            total = int(math.ceil(epochs * spe))

    # warm-up, in optimizer steps (HF: warmup_steps >= 1 is steps, a float < 1 a ratio; else warmup_ratio)
    ws = _num(raw.get("warmup_steps"), 0.0) or 0.0
    wr = _num(raw.get("warmup_ratio"), 0.0) or 0.0
    if ws >= 1:
        warmup = int(ws)
    elif 0 < ws < 1:
        warmup = math.ceil(total * ws) if total else -1
    elif wr > 0:
        warmup = math.ceil(total * wr) if total else -1
    else:
        warmup = 0
    sched = raw.get("lr_scheduler_type", defaults.get("lr_scheduler_type"))
    sched = None if sched is None else str(sched).lower()
    return _Run(fmt, optim, zero, rule, decay, adaptive, lr, wd, beta1, beta2, eps, ga, mgn, total, spe, warmup,
                sched, raw, assumed, invalid)


# ------------------------------------------------------------------------------------------------- model
@dataclass(frozen=True)
class ParamInfo:
    name: str
    numel: int
    kind: str  # "embedding" | "norm" | "bias" | "matrix"


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
        params.append(ParamInfo(full, int(p.numel()), kind))
    return params


def _params_llama_layout(c: dict) -> list[ParamInfo]:
    V, H = int(c["vocab_size"]), int(c["hidden_size"])
    ffn = int(c.get("intermediate_size", 4 * H))
    L = int(c.get("num_hidden_layers", 1))
    nh = int(c.get("num_attention_heads", 1))
    nkv = int(c.get("num_key_value_heads") or nh)
    hd = int(c.get("head_dim") or H // nh)
    attn_bias, mlp_bias = bool(c.get("attention_bias", False)), bool(c.get("mlp_bias", False))
    P = [ParamInfo("model.embed_tokens.weight", V * H, "embedding")]
    for i in range(L):
        pre = f"model.layers.{i}."
        for proj, (o, n) in {"q_proj": (nh * hd, H), "k_proj": (nkv * hd, H), "v_proj": (nkv * hd, H),
                             "o_proj": (H, nh * hd)}.items():
            P.append(ParamInfo(f"{pre}self_attn.{proj}.weight", o * n, "matrix"))
            if attn_bias:
                P.append(ParamInfo(f"{pre}self_attn.{proj}.bias", o, "bias"))
        for proj, (o, n) in {"gate_proj": (ffn, H), "up_proj": (ffn, H), "down_proj": (H, ffn)}.items():
            P.append(ParamInfo(f"{pre}mlp.{proj}.weight", o * n, "matrix"))
            if mlp_bias:
                P.append(ParamInfo(f"{pre}mlp.{proj}.bias", o, "bias"))
        P.append(ParamInfo(f"{pre}input_layernorm.weight", H, "norm"))
        P.append(ParamInfo(f"{pre}post_attention_layernorm.weight", H, "norm"))
    P.append(ParamInfo("model.norm.weight", H, "norm"))
    if not c.get("tie_word_embeddings", False):
        P.append(ParamInfo("lm_head.weight", V * H, "matrix"))
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


# -------------------------------------------------------------------------------------------------- checks
def diagnose(config: dict, model_config: dict | None = None, *, use_transformers: bool = True) -> list[Finding]:
    """Check a training config (HF TrainingArguments-style dict or our launch flags; see the module docstring)
    and, optionally, the model's ``config.json``. Returns the findings, errors first."""
    return summarize(config, model_config, use_transformers=use_transformers)[0]


def summarize(config: dict, model_config: dict | None = None, *,
              use_transformers: bool = True) -> tuple[list[Finding], dict]:
    """:func:`diagnose` plus the summary the CLI prints (timescale, run length, parameter counts...)."""
    if not isinstance(config, dict):
        raise TypeError(f"config must be a dict, got {type(config).__name__}")
    run = _normalise(config)
    F: list[Finding] = []
    add = F.append
    raw = run.raw

    for key, msg in run.invalid:
        add(Finding("invalid-value", "error", f"{msg}.", "The optimizer refuses this value (or the run is "
                    "meaningless with it).", f"Set a valid `{key}`.", {"key": key}))

    hf_lomo = run.format == "hf" and (not run.zero) and run.optim in ("lomo", "adalomo")
    wd_effective = run.wd
    if hf_lomo and run.wd > 0:
        add(Finding(
            "decay-ignored", "warn",
            f"weight_decay = {run.wd} with optim '{run.optim}': HF Trainer builds lomo_optim's {run.optim.title()}"
            " from the model and `lr` only, so the optimizer runs with its default weight_decay = 0.",
            "The run is not regularised the way the config says.",
            "Use `optim: zeroadamw` with `rule: lomo|adalomo, step_in_backward: true` (decay honoured, with the "
            "three decay modes), or build lomo_optim yourself with `weight_decay=` and pass it to Trainer.",
            {"weight_decay": run.wd}))
        wd_effective = 0.0

    # ---------------------------------------------------------------- timescale
    tau = tau_ep = None
    band = None
    lr_peak = _num(raw.get("lr_max")) or run.lr
    if wd_effective > 0 and run.lr > 0 and run.decay in ("decoupled", "independent", "l2"):
        if run.decay == "l2" and run.adaptive:
            add(Finding(
                "l2-with-adam", "warn",
                f"weight decay is an L2 penalty (decay='l2', λ = {run.wd}) through an adaptive optimizer "
                f"({run.optim}{'' if not run.zero else ', rule ' + run.rule}).",
                "The penalty's gradient λθ is divided by √v like any gradient: weights with large gradients are "
                "hardly regularised, and the best λ moves with the learning rate (Loshchilov & Hutter, ICLR 2019). "
                "There is no single decay timescale to reason with.",
                "Use decoupled decay: `decay: decoupled` (torch AdamW) or `decay: independent`, and retune λ "
                "(start from the τ band the doctor reports for it).",
                {"weight_decay": run.wd}))
        else:
            per_step = run.wd if run.decay == "independent" else lr_peak * run.wd
            tau = 1.0 / per_step
    if tau is not None:
        spe, total = run.steps_per_epoch, run.total_steps
        tau_ep = tau / spe if spe else None
        multi_epoch = spe is not None and total is not None and total >= spe
        if multi_epoch:
            band = (spe, float(total))
            short_limit = spe / TAU_TOLERANCE
        elif total is not None:
            band = (TAU_MIN_RUN_FRACTION * total, float(total))
            short_limit = TAU_MIN_RUN_FRACTION * total
        else:
            short_limit = None
        long_limit = TAU_TOLERANCE * total if total is not None else None

        def wd_for(t):  # the weight decay giving timescale t
            return 1.0 / t if run.decay == "independent" else 1.0 / (lr_peak * t)

        formula = "1/λ" if run.decay == "independent" else "1/(lr·λ)"
        what = f"τ = {formula} = {_steps(tau)} steps" + (f" = {tau_ep:.3g} epochs" if tau_ep is not None else "")
        data = {"tau_steps": tau, "tau_epochs": tau_ep, "total_steps": total, "steps_per_epoch": spe,
                "decay": run.decay, "weight_decay": run.wd, "lr": lr_peak}
        wd_range = ""
        if band:
            lo_wd, hi_wd = wd_for(band[1]), wd_for(band[0])
            data["weight_decay_range"] = [lo_wd, hi_wd]
            unit = "1 epoch" if multi_epoch else f"{TAU_MIN_RUN_FRACTION:.0%} of the run"
            wd_range = (f"weight_decay between {_fmt(lo_wd)} and {_fmt(hi_wd)} puts τ between {unit} and the whole "
                        f"run ({_steps(band[0])} to {_steps(band[1])} steps)")
        if per_step >= 1.0:
            add(Finding(
                "tau-too-short", "error",
                f"{what}: the per-step decay factor {1 - per_step:.3g} is ≤ 0.",
                "Every step multiplies the weights by zero or a negative number: the model cannot learn.",
                f"Lower weight_decay: {wd_range or 'λ·lr must be far below 1'}."
                + (" With decay='independent', λ is the per-step decay at the peak lr, not torch's λ: torch's "
                   "0.1 at lr 1e-4 is λ = 1e-5 here." if run.decay == "independent" else ""), data))
        elif short_limit is not None and tau < short_limit:
            if multi_epoch:
                why = ("AdamW's weights are an exponential moving average of its updates over the last ~τ steps "
                       "(Wang & Aitchison, ICML 2025); with τ under an epoch the model forgets most of each epoch "
                       "before the next one, i.e. it averages over only part of the data.")
                where = f"shorter than about one epoch ({_steps(spe)} steps)"
            else:
                why = ("AdamW's weights are an exponential moving average of its updates over the last ~τ steps "
                       "(Wang & Aitchison, ICML 2025); at the end of this run they average only the last "
                       f"{tau / total:.1%} of it.")
                where = f"under {TAU_MIN_RUN_FRACTION:.0%} of the {_steps(total)}-step run"
            add(Finding("tau-too-short", "warn", f"{what}: {where}.", why,
                        f"Lower weight_decay: {wd_range}."
                        + (" (decay='independent': λ is the per-step decay at the peak lr, so it is ~lr times "
                           "torch's λ.)" if run.decay == "independent" else ""), data))
        elif long_limit is not None and tau > long_limit:
            add(Finding(
                "tau-too-long", "warn",
                f"{what}: {tau / total:.3g}x the {_steps(total)}-step run"
                + (f" ({total / spe:.3g} epochs)" if spe else "") + ".",
                "With τ beyond the run the decay barely acts: the final weights still remember their "
                f"initialisation (a factor ≈ exp(-run/τ) = {math.exp(-total / tau):.2f} of it at constant lr), so "
                "weight decay is not doing what it is there for; the best τ in epochs stays roughly constant as "
                "models and data scale (Wang & Aitchison, ICML 2025). Fine-tuning may want the weights to stay near "
                "the pretrained ones, which a long τ does -- but then the decay is effectively off.",
                f"Raise weight_decay: {wd_range}. Or, if staying near the initial weights is the point, set "
                "weight_decay to 0 and say so." if wd_range else
                "Raise weight_decay so that τ is at most the run length.", data))
        if total is None:
            add(Finding(
                "run-length-unknown", "info", f"{what}; the run length is unknown, so τ is not compared with it.",
                "τ should lie between about one epoch and the whole run; β2 and warm-up are judged against the "
                "run too.",
                "Give `max_steps`, or `num_train_epochs` with `steps_per_epoch` (optimizer steps per epoch).", data))
        elif spe is None:
            add(Finding(
                "steps-per-epoch-unknown", "info",
                f"{what}; steps per epoch unknown, so τ cannot be put in epochs (only compared with the run).",
                "The lower end of the sensible range is one epoch: averaging over less than an epoch averages over "
                "only part of the data.",
                "Add `steps_per_epoch` (optimizer steps per epoch, after gradient accumulation), or "
                "`batches_per_epoch` (len(train_dataloader)), or `num_train_samples` + batch size + world_size.",
                data))
    elif run.wd == 0 and run.lr > 0:
        add(Finding(
            "tau-undefined", "info", "weight_decay = 0: no weight decay, so no AdamW timescale.",
            "Nothing pulls the weights back; fine for short fine-tunes close to a pretrained model, but the "
            "regulariser AdamW is named for is off.",
            "If you want decay, pick τ between one epoch and the run: decoupled λ = 1/(lr·τ), "
            "independent λ = 1/τ.",
            {}))
    if tau is None and run.total_steps is None and not any(f.code == "run-length-unknown" for f in F):
        add(Finding(
            "run-length-unknown", "info", "The run length is unknown (no `max_steps`, or no epochs × steps per "
            "epoch).", "Warm-up, β2 and the weight-decay timescale are judged against the run length.",
            "Give `max_steps`, or `num_train_epochs` with `steps_per_epoch` (optimizer steps per epoch).", {}))

    # ---------------------------------------------------------------- which params get decay
    params_summary = None
    if wd_effective > 0:
        decays, desc, assumed = _decay_rule(run)
        note = ("; assumed, since the config does not say how param groups are built: set `no_decay_groups` / "
                "`decay_embeddings`" if assumed else "")
        if model_config is not None:
            plist = model_parameters(model_config, use_transformers=use_transformers)
            dec = [p for p in plist if decays(p.name, p.kind)]
            params_summary = {"total": sum(p.numel for p in plist), "decayed": sum(p.numel for p in dec),
                              "tensors": len(plist), "decayed_tensors": len(dec), "grouping": desc}
            nb = [p for p in dec if p.kind in ("norm", "bias")]
            emb = [p for p in dec if p.kind == "embedding"]
        else:
            nb = [ParamInfo(n, 0, k) for k in ("norm", "bias") for n in _TYPICAL[k] if decays(n, k)]
            emb = [ParamInfo(n, 0, "embedding") for n in _TYPICAL["embedding"] if decays(n, "embedding")]
        if nb:
            kinds = sorted({p.kind for p in nb})
            what_nb = " and ".join({"norm": "norm gains", "bias": "biases"}[k] for k in kinds)
            if model_config is not None:
                ex = ", ".join(p.name for p in nb[:3]) + (", ..." if len(nb) > 3 else "")
                count = f": {len(nb)} tensors, {sum(p.numel for p in nb):,} elements ({ex})"
            else:
                count = f" (grouping: {desc}{note})"
            add(Finding(
                "decay-on-norms-biases", "warn", f"Weight decay λ = {run.wd} is applied to {what_nb}{count}.",
                "Norm gains and biases add almost no capacity, so decaying them does not regularise; it pulls "
                "RMSNorm/LayerNorm gains from 1 towards 0 (shrinking every activation the next layer sees) and "
                "biases towards 0, which the network has to fight every step.",
                "Put them in a group with weight_decay 0: `[{'params': matrices, 'weight_decay': λ}, {'params': "
                "norms_and_biases, 'weight_decay': 0.0}]` (HF Trainer does this), then set `no_decay_groups: true`.",
                {"params": [p.name for p in nb][:50], "elements": sum(p.numel for p in nb)}))
        if emb:
            if model_config is not None:
                count = f": {', '.join(p.name for p in emb)} ({sum(p.numel for p in emb):,} elements" + (
                    ", tied to the output layer)" if model_config.get("tie_word_embeddings") else ")")
            else:
                count = f" (grouping: {desc}{note})"
            add(Finding(
                "decay-on-embeddings", "info", f"Weight decay λ = {run.wd} is applied to the embeddings{count}.",
                "An embedding row gets a gradient only when its token occurs, but is decayed every step: rare "
                "tokens' rows shrink towards 0 between occurrences (and, tied, so do their output logits). Many "
                "LLM recipes accept this; many exclude embeddings.",
                "To exclude them, add the embedding to the weight_decay=0 group and set `decay_embeddings: false`.",
                {"params": [p.name for p in emb], "elements": sum(p.numel for p in emb)}))

    # ---------------------------------------------------------------- warm-up and β2
    total = run.total_steps
    resuming = _truthy(raw.get("resume_from_checkpoint"))
    no_opt_state = (resuming and (
        ("load_optimizer" in raw and not _truthy(raw["load_optimizer"]))
        or _truthy(raw.get("skip_optimizer_state")) or _truthy(raw.get("ignore_optimizer_state"))
        or _truthy(raw.get("save_only_model"))))
    if run.adaptive and run.warmup == 0 and (not resuming or no_opt_state) and run.lr > 0:
        horizon = 1.0 / (1.0 - run.beta2) if run.beta2 < 1 else float("inf")
        suggest = 2 * horizon if run.rule == "adamw" else 100
        if total:
            suggest = min(suggest, max(1, round(0.1 * total)))
        add(Finding(
            "warmup-missing", "warn", f"No learning-rate warm-up ({run.optim}"
            f"{', rule ' + run.rule if run.zero else ''}, lr {_fmt(run.lr)} from step 1).",
            "Adam's first updates have size ≈ lr in every coordinate whatever the gradient scale (m/√v ≈ ±1), "
            "and √v rests on a handful of gradients; full-lr steps then can wreck a pretrained model or diverge. A "
            "linear warm-up over ~2/(1-β2) steps (Ma & Yarats, 2021) or a few % of the run damps this.",
            f"Set `warmup_steps: {int(suggest)}` (or a `warmup_ratio` of a few %) with a scheduler that warms up.",
            {"suggested_warmup_steps": int(suggest)}))
    if run.warmup != 0 and run.scheduler in _NO_WARMUP_SCHEDULES:
        add(Finding(
            "warmup-ignored", "warn", f"Warm-up is set, but lr_scheduler_type '{run.scheduler}' has no warm-up.",
            "HF's get_scheduler builds 'constant', 'reduce_lr_on_plateau' and 'greedy' without the warm-up "
            "argument: the run starts at full lr.",
            "Use 'constant_with_warmup' (or 'linear' / 'cosine' / 'warmup_stable_decay').",
            {"scheduler": run.scheduler}))
    if total and run.warmup > 0 and run.warmup > WARMUP_MAX_FRACTION * total:
        sev = "error" if run.warmup >= total else "warn"
        add(Finding(
            "warmup-too-long", sev,
            f"Warm-up is {_steps(run.warmup)} of {_steps(total)} steps ({run.warmup / total:.0%} of the run).",
            "The lr only reaches its peak " + ("never" if run.warmup >= total else "late") + ": the run spends "
            "much of its budget at a lower lr than the one you tuned, and a decaying schedule has little room left.",
            f"Use a warm-up of a few % of the run (e.g. {max(1, round(0.05 * total))} steps).",
            {"warmup_steps": run.warmup, "total_steps": total}))
    if run.rule == "adamw" and total and run.beta2 < 1:
        horizon = 1.0 / (1.0 - run.beta2)
        if horizon > BETA2_MAX_RUN_FRACTION * total:
            b2 = 1.0 - 10.0 / total
            add(Finding(
                "beta2-too-long-for-run", "warn",
                f"β2 = {run.beta2}: the second-moment average spans 1/(1-β2) = {_steps(horizon)} steps, "
                f"{horizon / total:.0%} of the {_steps(total)}-step run.",
                "v then averages over most of the run: it lags when the gradient scale changes (early training, "
                "loss spikes) — updates too small after gradients shrink, too large after they grow — and its "
                "bias correction dominates for much of the run.",
                f"Lower β2 so that 1/(1-β2) is ≲ 10 % of the run (β2 ≈ {max(b2, 0.5):.3g}), or 0.95-0.98 as in "
                "LLM recipes.", {"beta2": run.beta2, "horizon_steps": horizon, "total_steps": total}))

    # ---------------------------------------------------------------- accumulation / clipping the mode cannot honour
    fp16 = _truthy(raw.get("fp16")) or str(raw.get("mixed_precision", "")).lower() == "fp16"
    if hf_lomo:
        if run.grad_accum > 1:
            add(Finding(
                "accumulation-unsupported", "error",
                f"gradient_accumulation_steps = {run.grad_accum} with optim '{run.optim}' (lomo_optim).",
                "LOMO updates each parameter inside backward; HF Trainer runs backward on every micro-batch, so "
                f"every micro-batch is an update: {run.grad_accum} small steps instead of one accumulated one.",
                "Set gradient_accumulation_steps to 1 (raise the batch size instead), or use `optim: zeroadamw` "
                "with `rule: lomo|adalomo, step_in_backward: true`, which accumulates into a 1/N shard under "
                "`no_sync()` and updates once.", {"gradient_accumulation_steps": run.grad_accum}))
        if run.max_grad_norm is not None:
            add(Finding(
                "clipping-unsupported", "error",
                f"max_grad_norm = {run.max_grad_norm} with optim '{run.optim}' (lomo_optim).",
                "LOMO frees each gradient in backward after using it, so Trainer's clip_grad_norm_ afterwards finds "
                "no gradients: nothing is clipped. lomo_optim's own clipping needs a second backward pass "
                "(grad_norm(loss)), which Trainer does not run.",
                "Set `max_grad_norm: 0` and accept no clipping, or use `optim: zeroadamw` with `step_in_backward: "
                "true, max_grad_norm: ...`: exact global-norm clipping without a second backward.",
                {"max_grad_norm": run.max_grad_norm}))
    sib = run.zero and _truthy(raw.get("step_in_backward"))
    if sib and run.max_grad_norm is None:
        if fp16:
            add(Finding(
                "fp16-fused-step-in-backward", "error",
                "step_in_backward without max_grad_norm (fused: updates during backward) with fp16 loss scaling.",
                "The fused mode updates each bucket before the loss scale's inf check at step() is known; "
                "ShardedAdamW refuses this combination at the first step().",
                "Set `max_grad_norm` (the update then waits for step(), exact clipping, no second backward), or "
                "train in bf16 without a GradScaler.", {}))
        if run.grad_accum > 1:
            add(Finding(
                "accumulation-needs-no-sync", "info",
                f"gradient_accumulation_steps = {run.grad_accum} with fused step_in_backward.",
                "In the fused mode every backward outside `opt.no_sync()` updates the weights; only backward passes "
                "under `no_sync()` accumulate. A loop (or trainer) that does not wrap all but the last micro-batch "
                "in `no_sync()` makes an update per micro-batch.",
                "Wrap every micro-batch but the last in `with opt.no_sync():`, or set `max_grad_norm` (the update "
                "then waits for step()).", {"gradient_accumulation_steps": run.grad_accum}))
    if run.zero and _truthy(raw.get("grads_reduced")) and (raw.get("stage", 2) == 2 or sib):
        add(Finding(
            "ddp-with-stage-2", "error", "grads_reduced (a DDP-wrapped model) with stage 2 / step_in_backward.",
            "Stage 2 and step-in-backward reduce gradients themselves in backward hooks; DDP would reduce them "
            "again, so ShardedAdamW refuses it.",
            "Drop DDP and `grads_reduced` (stage 2), or use `stage: 1, grads_reduced: true` to keep DDP.", {}))

    # ---------------------------------------------------------------- resume
    if resuming and no_opt_state:
        reason = ("the checkpoints are saved with save_only_model: true (no optimizer or scheduler state)"
                  if _truthy(raw.get("save_only_model")) else "the optimizer state is not loaded")
        add(Finding(
            "resume-without-optimizer-state", "error",
            f"resume_from_checkpoint = {raw.get('resume_from_checkpoint')!r}, but {reason}.",
            "Adam restarts with m = v = 0 and step 1 on trained weights: the first updates are ±lr in every "
            "coordinate (bias correction on empty moments), a jolt the original run had damped with warm-up; "
            "the LR schedule may restart as well.",
            "Load the optimizer state (zeroadamw.checkpoint.load restores model, optimizer and scheduler unless "
            "told not to); with HF, save full checkpoints (save_only_model: false). If you must start fresh, "
            "add a warm-up.", {}))
    if resuming and _truthy(raw.get("ignore_data_skip")):
        add(Finding(
            "resume-data-not-skipped", "info", "Resuming with ignore_data_skip: true.",
            "The data loader starts the epoch from its first batch again: the batches seen before the checkpoint "
            "are seen twice and the rest of the epoch is cut short (the step counter continues).",
            "Leave ignore_data_skip false unless skipping is too slow for your dataset.", {}))

    # ---------------------------------------------------------------- independent decay needs the schedule's peak
    if run.decay == "independent" and run.wd > 0:
        peak_given = _num(raw.get("lr_max"))
        sched = run.scheduler
        reason = None
        if peak_given is not None and not math.isclose(peak_given, run.lr, rel_tol=1e-9) and sched not in (
                "one_cycle", "onecycle"):
            reason = (f"the schedule's peak lr {peak_given} differs from the optimizer's lr {run.lr}; ShardedAdamW "
                      "divides by the group's initial_lr (OneCycleLR's max_lr when present)")
        elif sched is None:
            reason = "no lr_scheduler_type is given, so the schedule's peak is unknown"
        elif sched not in _KNOWN_SCHEDULES:
            reason = (f"lr_scheduler_type '{sched}' is unknown to the doctor; its peak may not be the lr the "
                      "optimizer was built with")
        if reason:
            add(Finding(
                "independent-without-schedule-peak", "warn", f"decay='independent' but {reason}.",
                "Independent decay is θ·(1 - λ·lr_t/lr_max): if lr_max is not the real peak, the decay is scaled "
                "by the wrong factor (above 1·λ per step when the lr rises above lr_max).",
                "Build the optimizer with lr = the schedule's peak and use a scheduler that scales it (LambdaLR, HF "
                "schedules, OneCycleLR), or set the group's `initial_lr` to the peak; give `lr_scheduler_type`.",
                {"lr": run.lr, "lr_max": peak_given, "scheduler": sched}))

    order = {"error": 0, "warn": 1, "info": 2}
    F.sort(key=lambda f: order[f.severity])
    spe = run.steps_per_epoch
    summary = {
        "format": run.format,
        "optimizer": run.optim,
        "rule": run.rule,
        "decay": run.decay,
        "learning_rate": run.lr,
        "lr_max": lr_peak,
        "weight_decay": run.wd,
        "betas": [run.beta1, run.beta2],
        "eps": run.eps,
        "total_steps": run.total_steps,
        "steps_per_epoch": spe,
        "run_epochs": (run.total_steps / spe) if (run.total_steps and spe) else None,
        "warmup_steps": run.warmup if run.warmup >= 0 else None,
        "gradient_accumulation_steps": run.grad_accum,
        "max_grad_norm": run.max_grad_norm,
        "tau_steps": tau,
        "tau_epochs": tau_ep,
        "tau_band_steps": list(band) if band else None,
        "beta2_horizon_steps": (1.0 / (1.0 - run.beta2)) if run.beta2 < 1 else None,
        "params": params_summary,
        "assumed": run.assumed,
        "counts": {s: sum(f.severity == s for f in F) for s in SEVERITIES},
    }
    return F, _jsonable(summary)


# ----------------------------------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", metavar="CONFIG",
                        help="training config: HF TrainingArguments-style JSON, our launch flags as JSON, or a file "
                             "of --flag value pairs ('-' = stdin)")
    parser.add_argument("--model", metavar="MODEL_CONFIG", default=None,
                        help="the model's HF config.json: name the params that get weight decay")
    parser.add_argument("--json", action="store_true", help='print {"findings": [...], "summary": {...}}')
    parser.epilog = "exit status: 0 no error-severity finding, 1 at least one, 2 unreadable input"


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
    parser = argparse.ArgumentParser(prog="zeroadamw doctor", description=__doc__.strip().splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
