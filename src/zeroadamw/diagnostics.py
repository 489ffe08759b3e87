r"""Training diagnostics for AdamW runs: per-group norms, update size, effective decay -- on 1 or N ranks.

What is measured after a step, per param group ``g`` (named by the group's ``"name"`` key, else ``group{i}``):

* ``param_norm``: :math:`\lVert\theta_g\rVert_2` (trainable params of the group);
* ``grad_norm`` / ``grad_norm_clipped``: :math:`\lVert g_g\rVert_2` of the rank-averaged gradient before and
  after global-norm clipping (clipping scales every group by the same coefficient ``clip_coef``);
* ``update_norm`` / ``update_ratio``: :math:`\lVert\theta_{g,t}-\theta_{g,s}\rVert_2` and its ratio to
  :math:`\lVert\theta_{g,s}\rVert_2`, where :math:`s` is the step at which :meth:`Diagnostics.snapshot` ran (the
  previous step when you collect every step): the whole change of the weights -- Adam's term *and* the decay;
* ``lr``, ``weight_decay``: the values the step used (before an LR scheduler or a weight-decay schedule moved
  them on);
* ``effective_decay``: the fraction of the weights the decay removed this step, :math:`\eta_t\lambda_t`
  (``decoupled``) or :math:`\eta_t\lambda_t/\eta_{max}` (``independent``); absent for ``l2``, whose decay goes
  through Adam's normalisation and has no closed form.

And, for the whole model: ``grad_norm``, ``grad_norm_clipped``, ``clip_coef``, ``skipped`` (1 when the step was
skipped for a non-finite gradient).

Sharding: with :class:`~zeroadamw.ShardedAdamW` / :class:`~zeroadamw.SparseAdamW` every rank sums the squares
of the elements it *owns* (each element of each bucket is owned by exactly one rank of the bucket's group) and
one all-reduce of a ``2 x groups`` vector gives the global sums, so the norms are those of the full model, equal
on every rank, and the update snapshot costs 1/N of the params per rank (in the param dtype). Gradient norms come
from the optimizer's own step statistics (:attr:`ShardedAdamW.group_grad_norms`) at no extra cost. **Every rank
must call** :meth:`Diagnostics.collect` and :meth:`Diagnostics.snapshot` (they are collectives there).

Other ``torch.optim`` optimizers (``torch.optim.AdamW``, ``zeroadamw.AdamW``) work in one process (or with
params replicated by DDP: the numbers are each rank's, which DDP keeps equal); their gradient norms are read
from ``param.grad``, so collect before ``zero_grad()``. Under DeepSpeed ZeRO, DeepSpeed owns the partitions: use
its own ``get_global_grad_norm()``; :class:`Diagnostics` refuses with that message.

Three ways to use it::

    diag = Diagnostics(opt)                       # any loop: call after opt.step(), on every rank
    logger = DiagnosticsLogger(opt, "diag.jsonl", tensorboard_dir="runs/x")
    for step, batch in enumerate(loader):
        loss = model(**batch).loss; loss.backward(); opt.step()
        logger.log(step, loss=loss.item())        # collects (every `every` steps), rank 0 writes
        opt.zero_grad(); sched.step()

    trainer = ZeroTrainer(...); attach(trainer)   # HF: to OUTPUT_DIR/diagnostics.jsonl, one console line per log
    attach(trainer, into_logs=True)               # ... and into Trainer's logs (report_to: TensorBoard, W&B...)

and ``zeroadamw plot diag.jsonl`` (or a Trainer's ``diagnostics.jsonl`` / ``trainer_state.json``) draws them.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from . import functional as F
from .plain import is_dtensor, local

__all__ = ["Diagnostics", "DiagnosticsLogger", "DiagnosticsCallback", "attach", "DIAGNOSTICS_FILE"]


def _unwrap(optimizer):
    """Accelerate's / Trainer's ``AcceleratedOptimizer`` wraps ours in ``.optimizer``."""
    for _ in range(4):
        inner = getattr(optimizer, "optimizer", None)
        if isinstance(inner, torch.optim.Optimizer) and inner is not optimizer:
            optimizer = inner
        else:
            break
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"Diagnostics needs a torch.optim.Optimizer, got {type(optimizer).__name__}")
    return optimizer


def _group_names(opt) -> list[str]:
    names = [str(g.get("name", f"group{i}")) for i, g in enumerate(opt.param_groups)]
    if len(set(names)) != len(names):  # duplicate "name" keys: keep them apart
        names = [f"{n}{i}" if names.count(n) > 1 else n for i, n in enumerate(names)]
    return names


class Diagnostics:
    """Per-group norms, update-to-weight ratio and effective decay of an optimizer (see the module docstring).

    Args:
        optimizer: a zeroadamw optimizer (any world size), or another ``torch.optim`` optimizer (one process).
        track_update: keep a snapshot of the (owned) params to measure the update; ``False`` drops
            ``update_norm`` / ``update_ratio`` and the snapshot's memory.
        prefix: prepended to every key (``"diag/"`` gives ``diag/group0/param_norm``; TensorBoard groups by it).
    """

    def __init__(self, optimizer, track_update: bool = True, prefix: str = "diag/") -> None:
        self.opt = _unwrap(optimizer)
        self.track_update = bool(track_update)
        self.prefix = prefix
        self._ours = hasattr(self.opt, "engine") and hasattr(self.opt, "group_grad_norms")
        if self._ours and getattr(self.opt, "_plain", False) and not self._fsdp:
            raise ValueError(self._deepspeed_msg())
        self._snap: list[tuple[int, Tensor, Tensor]] | None = None  # (group, live view, copy)
        self._hparams = None
        if not hasattr(self.opt, "_record_step_hparams"):  # another optimizer: record what each step used
            self.opt.register_step_pre_hook(self._record)

    def _record(self, opt, args, kwargs) -> None:
        self._hparams = [(float(g["lr"]), float(g.get("weight_decay", 0.0)), self._decay_of(g),
                          float(g.get("max_lr", g.get("initial_lr", g["lr"])))) for g in opt.param_groups]

    def _decay_of(self, group: dict) -> str:
        if "decay" in group:
            return group["decay"]
        decoupled = group.get("decoupled_weight_decay", False) or isinstance(self.opt, torch.optim.AdamW)
        return "decoupled" if decoupled else "l2"  # torch's Adam / SGD / ... add weight_decay to the gradient

    @staticmethod
    def _deepspeed_msg() -> str:
        return ("the optimizer runs as DeepSpeed ZeRO's client (DeepSpeed owns the partitions, so per-group norms "
                "over them need DeepSpeed's groups); use engine.get_global_grad_norm() there")

    # ------------------------------------------------------------------------------------------- the params
    @property
    def _fsdp(self) -> bool:
        """FSDP2 params (DTensors): each rank sums its local shards, weighted by 1 / their replicas (HSDP)."""
        return any(is_dtensor(p) for g in self.opt.param_groups for p in g["params"])

    def _owned(self) -> list[tuple[int, Tensor, float]]:
        """(group index, flat view, weight) of the params this rank accounts for: its owned ranges (ours), FSDP2's
        local shards (weight 1 / replicas), else all."""
        if self._ours and not self._fsdp:
            if getattr(self.opt, "_plain", False):
                raise ValueError(self._deepspeed_msg())
            out = []
            for bucket in self.opt.engine.buckets:
                if bucket.comm.counts_norm:  # a mesh: one row's shards make the whole
                    for i, s in enumerate(bucket.layout.slots):
                        if s.owned:
                            out.append((bucket.group_index, bucket.owned_param_view(i), 1.0))
            return out
        return [(gi, local(p).detach().reshape(-1), _weight(p)) for gi, g in enumerate(self.opt.param_groups)
                for p in g["params"] if p.requires_grad]

    def _all_reduce(self, t: Tensor) -> Tensor:
        comm = getattr(self.opt, "comm", None)
        if self._fsdp:  # FSDP2: the weighted local sums over every rank
            if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
                dist.all_reduce(t)
        elif self._ours and comm is not None and comm.world_size > 1:
            t = t.to(self.opt.control.device)
            comm.all_reduce(t, label="diagnostics")
        return t.cpu()  # one host read per collect()

    def snapshot(self) -> None:
        """Remember the current (owned) params; the next :meth:`collect` measures the update from here."""
        if self.track_update:
            self._snap = [(gi, v, v.clone(), w) for gi, v, w in self._owned()]

    # ------------------------------------------------------------------------------------------- collect
    def collect(self) -> dict[str, float]:
        """The diagnostics of the step just taken (a collective on N ranks: call it on every rank).

        Takes a fresh snapshot afterwards (for the next call), unless ``track_update=False``."""
        opt = self.opt
        n = len(opt.param_groups)
        parts: list[list[Tensor]] = [[] for _ in range(4 * n)]  # Σθ², Σ(θ - θ_s)², Σθ_s², FSDP2's Σg² per group
        owned = self._owned()
        for gi, v, w in owned:
            if v.numel():
                parts[gi].append(v.double().square().sum() * w)
        have_update = self.track_update and self._snap is not None
        if have_update:
            for gi, live, old, w in self._snap:
                if live.numel():
                    parts[n + gi].append((live.double() - old.double()).square().sum() * w)
                    parts[2 * n + gi].append(old.double().square().sum() * w)
        fsdp_grads = self._fsdp and not self._ours  # (ShardedAdamW on FSDP2 keeps its own group norms)
        if fsdp_grads:
            for gi, g in enumerate(self.opt.param_groups):
                parts[3 * n + gi] += [local(p.grad).double().square().sum() * _weight(p) for p in g["params"]
                                      if p.grad is not None]
        dev = next((v.device for _, v, _ in owned), torch.device("cpu"))
        zero = torch.zeros((), dtype=torch.float64, device=dev)
        sums = self._all_reduce(torch.stack([torch.stack(p).sum().to(dev) if p else zero for p in parts]))
        param_sq, upd_sq, prev_sq = sums[:n], sums[n : 2 * n], sums[2 * n : 3 * n]

        out: dict[str, float] = {}
        if fsdp_grads:
            has = [any(p.grad is not None for p in g["params"]) for g in self.opt.param_groups]
            groups = [math.sqrt(x) if h else float("nan") for x, h in zip(sums[3 * n :].tolist(), has)]
            total = math.sqrt(sum(x * x for x in groups))
            skipped, coef = False, 1.0
        elif self._ours:
            total = opt.grad_norm if opt.grad_norm is not None else float("nan")
            groups = list(opt.group_grad_norms) or [float("nan")] * n
            skipped = bool(opt.last_step_skipped)
            coef = F.clip_coefficient(float(total), opt.max_grad_norm)
        else:  # replicated params (one process, DDP): each rank's gradients are the whole
            groups = []
            for g in opt.param_groups:  # after zero_grad(set_to_none=True) there is nothing to read: NaN, not 0
                gs = [p.grad for p in g["params"] if p.grad is not None and not p.grad.is_sparse]
                groups.append(math.sqrt(sum(x.detach().double().square().sum().item() for x in gs))
                              if gs else float("nan"))
            total = math.sqrt(sum(x * x for x in groups))
            skipped = False
            coef = 1.0
        out["grad_norm"] = float(total)
        out["grad_norm_clipped"] = float(total) * coef
        out["clip_coef"] = coef
        out["skipped"] = float(skipped)
        hp = getattr(opt, "last_step_hparams", None) or self._hparams
        for gi, (name, g) in enumerate(zip(_group_names(opt), opt.param_groups)):
            key = f"{name}/"
            out[key + "param_norm"] = math.sqrt(param_sq[gi].item())
            out[key + "grad_norm"] = float(groups[gi])
            out[key + "grad_norm_clipped"] = float(groups[gi]) * coef
            if have_update:
                un = math.sqrt(upd_sq[gi].item())
                out[key + "update_norm"] = un
                pn = math.sqrt(prev_sq[gi].item())
                out[key + "update_ratio"] = un / pn if pn > 0 else float("nan")
            lr, wd, decay, lr_max = hp[gi] if hp and gi < len(hp) else (
                float(g["lr"]), float(g.get("weight_decay", 0.0)), self._decay_of(g),
                float(g.get("max_lr", g.get("initial_lr", g["lr"]))))
            out[key + "lr"] = lr
            out[key + "weight_decay"] = wd
            if decay != "l2" and not skipped:
                out[key + "effective_decay"] = lr * F.effective_weight_decay(decay, wd, lr_max) if wd else 0.0
        self._snap = None
        self.snapshot()
        return {self.prefix + k: v for k, v in out.items()}


def _weight(p: Tensor) -> float:
    """1 / the number of ranks holding the same local shard of ``p`` (FSDP2's HSDP replicates over a mesh
    dimension): the weighted local sums, summed over every rank, count each element once. 1 for a plain tensor."""
    if not is_dtensor(p):
        return 1.0
    from torch.distributed.tensor import Replicate

    replicas = 1
    for size, placement in zip(p.device_mesh.shape, p.placements):
        if isinstance(placement, Replicate):
            replicas *= size
    return 1.0 / replicas


class DiagnosticsLogger:
    """Plain training loops: ``log(step, **extra)`` after ``opt.step()`` on every rank; rank 0 appends one JSON
    line per collected step to ``path`` (``{"step": ..., "loss": ..., "diag/...": ...}``) and, with
    ``tensorboard_dir`` (and tensorboard installed), writes the same scalars there. ``every=k`` collects at steps
    divisible by k (and snapshots the params one step before, so ``update_ratio`` is still that of one step)."""

    def __init__(self, optimizer, path: str | os.PathLike | None = None, *, every: int = 1,
                 tensorboard_dir: str | None = None, track_update: bool = True) -> None:
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be a positive int, got {every!r}")
        self.diag = Diagnostics(optimizer, track_update=track_update)
        self.every = every
        self.path = None if path is None else os.fspath(path)
        self.history: list[dict[str, Any]] = []
        self._rank0 = not (torch.distributed.is_available() and torch.distributed.is_initialized()
                           and torch.distributed.get_rank() != 0)
        self._tb = None
        if tensorboard_dir is not None and self._rank0:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise ImportError(f"tensorboard_dir needs tensorboard: pip install tensorboard ({e})") from None
            self._tb = SummaryWriter(tensorboard_dir)
        if self.path and self._rank0:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)

    def log(self, step: int, **extra: float) -> dict[str, float] | None:
        """Collect (when ``step % every == 0``) and write; returns the record (on every rank) or None."""
        rec = None
        if step % self.every == 0:
            rec = {"step": int(step), **{k: float(v) for k, v in extra.items()}, **self.diag.collect()}
            self.history.append(rec)
            if self._rank0:
                if self.path:
                    with open(self.path, "a") as f:
                        f.write(json.dumps(rec) + "\n")
                if self._tb is not None:
                    for k, v in rec.items():
                        if k != "step" and math.isfinite(v):
                            self._tb.add_scalar(k, v, step)
        if self.every > 1 and (step + 1) % self.every == 0:
            self.diag.snapshot()
        return rec

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def _callback_base():
    try:
        from transformers import TrainerCallback
    except ImportError:  # pragma: no cover - transformers is an optional dependency
        return object
    return TrainerCallback


DIAGNOSTICS_FILE = "diagnostics.jsonl"


def _summary_line(step: int, vals: dict[str, float], prefix: str = "diag/") -> str:
    """One console line for a step's diagnostics: per-group update/weight ratio and param norm, the clip coef."""
    groups: dict[str, dict[str, float]] = {}
    for k, v in vals.items():
        rest = k[len(prefix):] if k.startswith(prefix) else k
        if "/" in rest:
            g, metric = rest.rsplit("/", 1)
            groups.setdefault(g, {})[metric] = v
    parts = []
    ratio = [f"{g} {m['update_ratio']:.1e}" for g, m in groups.items() if "update_ratio" in m]
    if ratio:
        parts.append("update/weight " + ", ".join(ratio))
    norm = [f"{g} {m['param_norm']:.4g}" for g, m in groups.items() if "param_norm" in m]
    if norm:
        parts.append("|θ| " + ", ".join(norm))
    if prefix + "clip_coef" in vals:
        parts.append(f"clip coef {vals[prefix + 'clip_coef']:.3g}")
    if vals.get(prefix + "skipped"):
        parts.append("STEP SKIPPED (non-finite gradient)")
    return f"diagnostics step {step}: " + "; ".join(parts)


def _console(line: str) -> None:
    try:  # below Trainer's progress bar, not through it
        from tqdm.auto import tqdm

        tqdm.write(line)
    except ImportError:  # pragma: no cover - tqdm comes with transformers
        print(line, flush=True)


class DiagnosticsCallback(_callback_base()):
    """HF ``TrainerCallback``: on every logging step, collects the diagnostics (on every rank: a collective) and
    rank 0 appends them, with Trainer's own numbers of that step (``loss``, ``grad_norm``, ``learning_rate``) and
    the evaluation results (``eval_loss``), as one JSON line to ``path`` (default ``OUTPUT_DIR/diagnostics.jsonl``;
    ``zeroadamw plot`` reads it). The console gets one summary line per logging step (``summary=False``: none);
    Trainer's logs stay as they are -- about 20 ``diag/*`` values per step would swamp its progress bar.

    ``into_logs=True`` adds every value to Trainer's logs as well -- and so to ``trainer.state.log_history`` /
    ``trainer_state.json`` and every ``report_to`` integration (TensorBoard, W&B, ...) that runs after this
    callback (:func:`attach` puts it first then). ``path=False``: no file.

    A fresh run (``global_step == 0`` at the start) truncates the file; a resumed run keeps the records up to the
    step it resumes from and appends. ``file``: the path written (rank 0, once training began), else None."""

    def __init__(self, track_update: bool = True, path: str | os.PathLike | bool | None = None,
                 into_logs: bool = False, summary: bool = True) -> None:
        self.track_update = track_update
        self.path = None if path is None or path is True else (False if path is False else os.fspath(path))
        self.into_logs = bool(into_logs)
        self.summary = bool(summary)
        self.diag: Diagnostics | None = None
        self._pending: tuple[int, dict[str, float]] | None = None
        self.file: str | None = None  # set at on_train_begin, on rank 0

    def _diag(self, optimizer) -> Diagnostics:
        if self.diag is None or self.diag.opt is not _unwrap(optimizer):
            self.diag = Diagnostics(optimizer, track_update=self.track_update)
        return self.diag

    @staticmethod
    def _logs_at(args, step: int) -> bool:
        strategy = str(getattr(args.logging_strategy, "value", args.logging_strategy))
        steps = args.logging_steps
        if strategy != "steps" or not steps:
            return False
        every = max(1, int(steps if steps >= 1 else math.ceil(steps * max(1, getattr(args, "max_steps", 1)))))
        return step % every == 0

    def _open_file(self, args, state) -> None:
        """Rank 0: resolve the file; truncate it for a fresh run, keep the records up to the resumed step."""
        self.file = None
        if self.path is False or not state.is_world_process_zero:
            return
        path = self.path or os.path.join(args.output_dir, DIAGNOSTICS_FILE)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        keep: list[str] = []
        if state.global_step > 0 and os.path.isfile(path):
            with open(path) as f:
                for line in f:
                    try:
                        if json.loads(line).get("step", math.inf) <= state.global_step:
                            keep.append(line if line.endswith("\n") else line + "\n")
                    except (json.JSONDecodeError, AttributeError):
                        continue
        with open(path, "w") as f:
            f.writelines(keep)
        self.file = path
        if self.summary:
            _console(f"diagnostics: every logging step -> {path} (draw: zeroadamw plot {path})")

    def _write(self, rec: dict[str, Any]) -> None:
        if self.file is not None:
            with open(self.file, "a") as f:
                f.write(json.dumps(rec) + "\n")

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        self._open_file(args, state)
        if optimizer is None:
            return
        d = self._diag(optimizer)  # early: another optimizer's step hook must see the first step
        if self._logs_at(args, state.global_step + 1):
            d.snapshot()

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        if optimizer is None:
            return
        d = self._diag(optimizer)
        if control.should_log or self._logs_at(args, state.global_step):
            self._pending = (state.global_step, d.collect())  # collect also snapshots
        elif self._logs_at(args, state.global_step + 1):
            d.snapshot()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None:
            return
        numbers = {k: float(v) for k, v in logs.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
        if self._pending is None:
            if any(k.startswith("eval_") for k in numbers):  # evaluation results: the plot's validation loss
                self._write({"step": int(state.global_step), **numbers})
            return
        step, pending = self._pending
        if step != state.global_step:  # collected for a step that did not log: stale now
            self._pending = None
            return
        vals = {k: v for k, v in pending.items() if math.isfinite(v)}
        self._write({"step": int(step), **{k: v for k, v in numbers.items() if k not in vals}, **vals})
        if self.into_logs:
            logs.update(vals)
            if state.log_history and state.log_history[-1].get("step") == state.global_step:
                state.log_history[-1].update(vals)
        if self.summary and state.is_world_process_zero:
            _console(_summary_line(step, vals, self.diag.prefix if self.diag is not None else "diag/"))
        self._pending = None


def attach(trainer, track_update: bool = True, path: str | os.PathLike | bool | None = None,
           into_logs: bool = False, summary: bool = True) -> DiagnosticsCallback:
    """Add a :class:`DiagnosticsCallback` to ``trainer``; returns it. By default the diagnostics go to
    ``OUTPUT_DIR/diagnostics.jsonl`` (and one summary line per logging step to the console), after Trainer's own
    callbacks; ``into_logs=True`` also puts them into Trainer's logs, ahead of its reporting callbacks."""
    cb = DiagnosticsCallback(track_update=track_update, path=path, into_logs=into_logs, summary=summary)
    if into_logs:
        trainer.callback_handler.callbacks.insert(0, cb)
    else:
        trainer.callback_handler.callbacks.append(cb)
    return cb
