"""Sharded, reshardable, atomic checkpoints on ``torch.distributed.checkpoint`` (DCP).

::

    save(path, model=model, optimizer=opt, scheduler=sched, extra={"epoch": 3})   # collective
    extra = load(path, model=model, optimizer=opt, scheduler=sched)              # collective, any world size
    export_consolidated(path, out_dir)   # offline, one process: optimizer.pt (torch AdamW format) + model.safetensors

Layout of a checkpoint directory::

    path/
      .metadata            DCP's metadata (DCP's own format)
      __<rank>_0.distcp    DCP's per-rank payload files: tensors only, each read back with weights_only=True
      zeroadamw.json       ours, plain JSON: format version, world size, model tensor names/shapes/dtypes,
                           optimizer param groups (hyperparameters + parameter *names*), the expert-group
                           layout, scheduler state, ``extra``, and the size + CRC-32 of every file above;
                           written last

**What is stored.** Model tensors under ``model/<name>`` (replicated; DCP writes each once). Optimizer state per
parameter *name* (FQN): ``optim/<fqn>/exp_avg``, ``.../exp_avg_sq`` and, for bf16/fp16 params, ``.../master`` as
1-D tensors of the parameter's ``numel`` elements, each rank writing only the element range it owns; plus
``optim/<fqn>/step``. A different world size or bucket size loads by reading the ranges it now owns (DCP plans
the reads across the saved chunks). Plain ``torch.optim`` optimizers are saved too (replicated state, same keys).

**Expert groups.** A param group with a ``"process_group"`` (SparseAdamW's expert-data-parallel groups) holds
*different* tensors under the same names in each of its groups. Its groups must partition the world; they are
numbered ``k = 0 .. n-1`` by their smallest global rank (found by one object all-gather, no user input), and
every tensor of the param group is stored per group: ``model/<name>@ep<k>`` and ``optim/<fqn>@ep<k>/<kind>``
(each group's ranks write their own ranges; ``n = 1``, or no ``process_group``: no suffix).
``zeroadamw.json["expert_groups"]`` records, per param group, ``null`` or ``{"count": n, "ranks": [[...], ...]}``,
and which model tensors are stored per group. ``load`` reads each rank's own group's keys: the ranks per group
(expert data parallelism) may change, the number of groups may not (a :class:`CheckpointError` names it).
The expert layout comes from the optimizer: saving the model alone (``optimizer=None``) stores one group's
experts, and loading a checkpoint with per-group model tensors needs ``optimizer=``.

**Atomic, and failures are shared.** Every rank writes into ``.<name>.tmp-<token>`` next to ``path`` and computes
the size and CRC-32 of the files it wrote; the tables (and any failure) are all-gathered; rank 0 writes the
metadata and swaps the directory in (old → ``.<name>.old-<token>``, new → ``path``, old deleted). Each phase
ends in that all-gather of outcomes: an exception on any rank -- writing, checksumming, rank 0's metadata write
or swap -- raises the same :class:`CheckpointError` on every rank (no rank waits for one that failed), after the
previous checkpoint was put back and the temporary directory deleted. A crash before the swap leaves the
previous checkpoint untouched (the temporary directory is never accepted by ``load``: no ``zeroadamw.json``),
and a crash between the two renames is repaired by the next ``load``/``save``.

**Validated on load, before anything is changed:** the JSON exists and has our format; every listed file exists
with its size and CRC-32 (each rank checks a share; truncated or corrupt files are named); the model's tensor
names and shapes and the optimizer's param groups (by name) and shapes match. Then the model and the optimizer
are loaded in place.

**The classic resume mistake** (model restored, optimizer fresh: AdamW moments at zero with a large step count
make training diverge) is hard to make: ``load`` restores the optimizer unless ``optimizer=None``; then the
model's parameters are marked and a ShardedAdamW over them that starts with fresh state warns, loudly, once.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
import uuid
import warnings
import zlib
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import Tensor
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType

from . import quant
from .plain import is_dtensor, local
from .sharded_adamw import ShardedAdamW

__all__ = ["save", "load", "export_consolidated", "CheckpointError", "META_FILE"]

META_FILE = "zeroadamw.json"
FORMAT = "zeroadamw-checkpoint"
VERSION = 1
RESUMED_ATTR = "_zeroadamw_resumed_step"


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as asked: the message names what is wrong."""


# --------------------------------------------------------------------------------------------- DCP plumbing
class _Range:
    """A rank's contiguous element range ``[offset, offset + local.numel())`` of a flat tensor of ``numel``
    elements: what DCP writes as one chunk and reads back by overlap, whatever ranges the saver owned."""

    def __init__(self, local: Tensor, offset: int, numel: int) -> None:
        self.local = local
        self.offset = offset
        self.numel = numel

    def size(self) -> torch.Size:
        return torch.Size([self.numel])

    def _chunk(self) -> ChunkStorageMetadata:
        return ChunkStorageMetadata(offsets=torch.Size([self.offset]), sizes=torch.Size([self.local.numel()]))

    def __create_write_items__(self, fqn: str, obj: Any) -> list[WriteItem]:
        if self.local.numel() == 0:
            return []
        return [
            WriteItem(
                index=MetadataIndex(fqn, torch.Size([self.offset])),
                type=WriteItemType.SHARD,
                tensor_data=TensorWriteData(
                    chunk=self._chunk(), properties=TensorProperties.create_from_tensor(self.local), size=self.size()
                ),
            )
        ]

    def __create_chunk_list__(self) -> list[ChunkStorageMetadata]:
        return [self._chunk()] if self.local.numel() else []


class _SavePlanner(DefaultSavePlanner):
    def lookup_object(self, index: MetadataIndex) -> Any:
        obj = self.state_dict[index.fqn]
        return obj.local if isinstance(obj, _Range) else super().lookup_object(index)


class _BoundedWriter(dcp.FileSystemWriter):
    """DCP's file writer, but a rank's items are split into files of at most ``max_file_bytes``.

    DCP copies a tensor that is a view (our shards are views into flat buffers) and keeps every copy of a file
    until the file is closed; one file per rank would hold a copy of the rank's whole shard. Files of bounded
    size bound that transient memory."""

    def __init__(self, path: str, max_file_bytes: int) -> None:
        super().__init__(path, single_file_per_rank=True, sync_files=True)
        self.max_file_bytes = max_file_bytes
        self.written: list[str] = []  # this rank's payload files (names relative to path): the ones it CRCs

    def write_data(self, plan, planner):
        import queue

        from torch.distributed.checkpoint.filesystem import DEFAULT_SUFFIX

        groups: list[list] = [[]]
        size = 0
        for item in plan.items:
            n = 0
            if item.tensor_data is not None:
                n = math.prod(item.tensor_data.chunk.sizes) * torch.empty((), dtype=item.tensor_data.properties.dtype).element_size()
            if groups[-1] and size + n > self.max_file_bytes:
                groups.append([])
                size = 0
            groups[-1].append(item)
            size += n
        file_queue: queue.Queue = queue.Queue()
        for k, items in enumerate(g for g in groups if g):
            name = f"{plan.storage_data.prefix}{k}{DEFAULT_SUFFIX}"
            self.written.append(name)
            file_queue.put((self.fs.concat_path(self.path, name), name, items))
        return self._write_data(planner, file_queue)


class _LoadPlanner(DefaultLoadPlanner):
    def set_up_planner(self, state_dict, metadata=None, is_coordinator: bool = False) -> None:
        # DCP's _init_state_dict replaces values it does not know (our _Range) with None: keep them out of it
        ranges = {k: v for k, v in state_dict.items() if isinstance(v, _Range)}
        super().set_up_planner({k: v for k, v in state_dict.items() if k not in ranges}, metadata, is_coordinator)
        self.state_dict.update(ranges)

    def lookup_tensor(self, index: MetadataIndex) -> Tensor:
        obj = self.state_dict[index.fqn]
        return obj.local if isinstance(obj, _Range) else super().lookup_tensor(index)


def _quiet(fn, *args, **kwargs):
    """DCP warns that it 'assumes a single process' even when told so (no_dist=True); keep our users' logs clean."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled, unavailable or uninitialized.*")
        return fn(*args, **kwargs)


def _sharded(optimizer) -> bool:
    """A ShardedAdamW holding its own shards (under FSDP2 it is a plain optimizer on FSDP2's shards)."""
    return isinstance(optimizer, ShardedAdamW) and not optimizer._check_plain()


def _dist() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _rank() -> int:
    return dist.get_rank() if _dist() else 0


def _broadcast_obj(obj: Any) -> Any:
    if not _dist():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _all_gather_obj(obj: Any) -> list[Any]:
    if not _dist():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _agreed(path: str, what: str, fn=None, *, op: str = "saving", as_is: bool = False, gather: bool = True) -> Any:
    """Run ``fn()`` on this rank (``None``: this rank has nothing to do here) and share the outcome with every
    rank (one object all-gather, which is also the barrier): when it raised on any rank, every rank raises the
    same :class:`CheckpointError`, naming the ranks and their errors -- no rank is left waiting in a collective
    for one that failed. ``as_is``: when every rank raised the same message (a deterministic error, e.g. a
    validation), each re-raises its own exception unchanged. Returns every rank's result, by rank (``gather``),
    or only this rank's (``gather=False``: only the outcome travels)."""
    result, error, exc = None, None, None
    if fn is not None:
        try:
            result = fn()
        except Exception as e:  # noqa: BLE001 - shared with every rank, re-raised below (chained on this rank)
            exc, error = e, f"{type(e).__name__}: {e}"
    everyone = _all_gather_obj((error, result if gather and error is None else None))
    failed = [(r, err) for r, (err, _) in enumerate(everyone) if err is not None]
    if not failed:
        return [res for _, res in everyone] if gather else result
    if as_is and exc is not None and len(failed) == len(everyone) and len({err for _, err in failed}) == 1:
        raise exc
    tail = f" -- every rank stopped; the checkpoint at {path} (if there was one) is as it was" if op == "saving" else ""
    raise CheckpointError(
        f"{op} {path} failed while {what} -- " + "; ".join(f"rank {r}: {err}" for r, err in failed) + tail) from exc


# --------------------------------------------------------------------------------------------- JSON helpers
def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _dtype(name: str) -> torch.dtype:
    dt = getattr(torch, name, None)
    if not isinstance(dt, torch.dtype):
        raise CheckpointError(f"unknown dtype {name!r} in {META_FILE}")
    return dt


def _jsonable(x: Any, where: str) -> Any:
    if isinstance(x, (str, int, bool)) or x is None:
        return x
    if isinstance(x, float):
        if not math.isfinite(x):
            return {"__float__": repr(x)}
        return x
    if isinstance(x, (list, tuple)):
        return [_jsonable(v, f"{where}[{i}]") for i, v in enumerate(x)]
    if isinstance(x, dict):
        out = {}
        for k, v in x.items():
            if not isinstance(k, (str, int)):
                raise TypeError(f"{where}: keys must be str or int to be stored as JSON, got {type(k).__name__}")
            out[str(k)] = _jsonable(v, f"{where}.{k}")
        return out
    if isinstance(x, Tensor) and x.numel() == 1:
        return x.item()
    if isinstance(x, torch.dtype):
        return {"__dtype__": _dtype_name(x)}
    raise TypeError(
        f"{where} is a {type(x).__name__}, which can't be stored as JSON; checkpoints hold tensors and JSON only "
        "(no pickles). Store plain numbers/strings/lists/dicts, or tensors in `extra`."
    )


def _unjson(x: Any) -> Any:
    if isinstance(x, list):
        return [_unjson(v) for v in x]
    if isinstance(x, dict):
        if set(x) == {"__float__"}:
            return float(x["__float__"])
        if set(x) == {"__dtype__"}:
            return _dtype(x["__dtype__"])
        return {k: _unjson(v) for k, v in x.items()}
    return x


def _split_extra(extra: Any, prefix: str, tensors: dict[str, Tensor]) -> Any:
    """JSON for ``extra`` with tensors replaced by markers; the tensors go to DCP under ``prefix``."""
    if isinstance(extra, Tensor):
        key = f"extra/{prefix}"
        tensors[key] = extra.detach().contiguous()
        return {"__tensor__": key, "shape": list(extra.shape), "dtype": _dtype_name(extra.dtype)}
    if isinstance(extra, dict):
        return {str(k): _split_extra(v, f"{prefix}.{k}", tensors) for k, v in extra.items()}
    if isinstance(extra, (list, tuple)):
        return [_split_extra(v, f"{prefix}[{i}]", tensors) for i, v in enumerate(extra)]
    return _jsonable(extra, f"extra{prefix}")


def _extra_dests(j: Any, dests: dict[str, Tensor]) -> None:
    if isinstance(j, dict):
        if "__tensor__" in j:
            dests[j["__tensor__"]] = torch.empty(j["shape"], dtype=_dtype(j["dtype"]))
            return
        for v in j.values():
            _extra_dests(v, dests)
    elif isinstance(j, list):
        for v in j:
            _extra_dests(v, dests)


def _join_extra(j: Any, tensors: dict[str, Tensor]) -> Any:
    if isinstance(j, dict):
        if "__tensor__" in j:
            return tensors[j["__tensor__"]]
        return {k: _join_extra(v, tensors) for k, v in j.items()}
    if isinstance(j, list):
        return [_join_extra(v, tensors) for v in j]
    return _unjson(j)


# --------------------------------------------------------------------------------------------- optimizer views
def _param_names(model: torch.nn.Module | None, optimizer: torch.optim.Optimizer) -> dict[Tensor, str]:
    if model is None:
        raise ValueError("saving/loading an optimizer needs model= too: optimizer state is stored by parameter name")
    names: dict[Tensor, str] = {}
    for name, p in model.named_parameters(remove_duplicate=True):
        names.setdefault(p, name)
    missing = [i for g in optimizer.param_groups for i, p in enumerate(g["params"]) if p not in names]
    if missing:
        raise ValueError(
            f"{len(missing)} optimizer parameter(s) are not parameters of the given model; pass the model the "
            "optimizer was built on (unwrap DDP/PEFT wrappers consistently at save and load)"
        )
    return names


def _groups_json(optimizer: torch.optim.Optimizer, names: dict[Tensor, str]) -> list[dict]:
    groups = []
    for gi, g in enumerate(optimizer.param_groups):
        hyper = {k: _jsonable(v, f"param_groups[{gi}].{k}") for k, v in g.items()
                 if k not in ("params", "param_names", "process_group")}
        hyper["params"] = [names[p] for p in g["params"]]
        groups.append(hyper)
    return groups


def _sharded_entries(opt: ShardedAdamW, names: dict[Tensor, str],
                     keys: dict[Tensor, str]) -> tuple[dict[str, Any], dict[str, dict]]:
    """DCP entries for a ShardedAdamW: owned element ranges of sharded state (views into its state: no copies),
    replicated tensors for replicated state (AdaLomo's row/column moments), the step; and the per-param JSON
    description (shape and dtype of every kind, whether it is sharded), by parameter name. Entries are keyed
    ``optim/<keys[p]>/<kind>`` (the name, with the expert-group suffix for expert params)."""
    opt._init_state()
    entries: dict[str, Any] = {}
    desc: dict[str, dict] = {}
    for bucket in opt.engine.buckets:
        for i, p in enumerate(bucket.params):
            fqn, key = names[p], keys[p]
            s = bucket.layout.slots[i]
            kinds = {}
            for kind, (how, t) in opt._state_kinds(p).items():
                shape = list(opt._state_shape(p, how, t))
                if how == "range":
                    entries[f"optim/{key}/{kind}"] = _Range(t, s.own_lo, s.numel)
                elif how == "rows":
                    lo, _ = opt._rows_range(bucket, i)
                    entries[f"optim/{key}/{kind}"] = _Range(t, lo, p.shape[0])
                elif how == "blocks":  # int8 scales: the owned blocks (params start on block boundaries)
                    entries[f"optim/{key}/{kind}"] = _Range(t, s.own_lo // quant.BLOCK, quant.nblocks(s.numel))
                else:
                    entries[f"optim/{key}/{kind}"] = t
                kinds[kind] = {"shape": shape, "dtype": _dtype_name(t.dtype),
                               "sharded": how in ("range", "rows", "blocks")}
            desc[fqn] = {"shape": list(p.shape), "dtype": _dtype_name(p.dtype), "kinds": kinds, "rule": opt.rule}
    return entries, desc


def _dtensor_range(t: Tensor) -> tuple[int, tuple[int, ...]]:
    """Where FSDP2's local shard of DTensor ``t`` starts in the flattened tensor, and its local shape: FSDP2
    shards dim 0 (replicating over an HSDP mesh's other dimension), so the local rows are one flat range."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    if any(offset[1:]):
        raise CheckpointError("zeroadamw.checkpoint saves DTensors sharded along dim 0 only (FSDP2's default "
                              f"Shard(0)); got placements {t.placements}")
    row = t.numel() // t.shape[0] if t.ndim and t.shape[0] else 0
    return (offset[0] * row if t.ndim else 0), tuple(shape)


def _flat_entry(t: Tensor) -> Any:
    """A state tensor shaped like its param, as the 1-D entry of ``numel`` elements the format stores: itself,
    or for a DTensor (FSDP2) this rank's flat range of it."""
    if not is_dtensor(t):
        return t.detach().reshape(-1)
    lo, _ = _dtensor_range(t)
    return _Range(local(t).detach().reshape(-1), lo, t.numel())


def _plain_entries(opt: torch.optim.Optimizer, names: dict[Tensor, str],
                   keys: dict[Tensor, str]) -> tuple[dict[str, Any], dict[str, dict]]:
    """Any torch.optim optimizer: per-param state tensors (replicated) under the same keys."""
    entries: dict[str, Any] = {}
    desc: dict[str, dict] = {}
    for g in opt.param_groups:
        for p in g["params"]:
            st = opt.state.get(p, {})
            fqn, key = names[p], keys[p]
            kinds = {}
            for k, v in st.items():
                if k == "step":
                    entries[f"optim/{key}/step"] = (v.detach().reshape(()).to(torch.float32) if isinstance(v, Tensor)
                                                    else torch.tensor(float(v), dtype=torch.float32))
                    kinds["step"] = {"shape": [], "dtype": "float32", "sharded": False}
                elif isinstance(v, Tensor) and v.shape == p.shape:
                    entries[f"optim/{key}/{k}"] = _flat_entry(v)
                    kinds[k] = {"shape": list(p.shape), "dtype": _dtype_name(v.dtype), "sharded": True}
                elif is_dtensor(p):
                    raise TypeError(f"optimizer state {k!r} of {fqn} is kept per local shard of an FSDP2 parameter "
                                    "(int8 scales): zeroadamw.checkpoint cannot reshard it; use state_dtype='bf16' "
                                    "or 'fp32' under FSDP2, or torch.distributed.checkpoint")
                else:
                    raise TypeError(f"optimizer state {k!r} of {fqn} is not a tensor of the parameter's shape")
            if st:
                desc[fqn] = {"shape": list(p.shape), "dtype": _dtype_name(p.dtype), "kinds": kinds,
                             "rule": type(opt).__name__}
    return entries, desc


# -------------------------------------------------------------------------------------------- expert groups
def _ep_name(name: str, k: int | None) -> str:
    """The key of a tensor of expert group ``k`` (``None``: a tensor with one copy in the whole world)."""
    return name if k is None else f"{name}@ep{k}"


def _expert_layout(optimizer: torch.optim.Optimizer) -> tuple[list[dict | None], list[int | None]]:
    """Per param group: its expert-group layout (JSON: ``count`` and each group's global ``ranks``) and this rank's
    expert-parallel index ``k`` in ``[0, count)``; ``None`` for both where the group has no ``process_group`` or
    one that spans the world (one copy of its params). A collective (one object all-gather) when distributed.

    A param group's ``process_group`` (SparseAdamW's expert-data-parallel groups) holds *different* tensors under
    the same names in each of its groups, so every group's tensors are stored under their own keys. ``k`` numbers
    the distinct groups by their smallest global rank; they must partition the world."""
    n = len(optimizer.param_groups)
    if not _dist():
        return [None] * n, [None] * n
    world = dist.get_world_size()
    mine = []
    for g in optimizer.param_groups:
        pg = g.get("process_group")
        if pg is None:
            mine.append(None)
        else:
            mine.append((tuple(sorted(dist.get_process_group_ranks(pg))),
                         [[list(p.shape), _dtype_name(p.dtype)] for p in g["params"]]))
    everyone = _all_gather_obj(mine)
    layout: list[dict | None] = []
    index: list[int | None] = []
    for gi in range(n):
        per_rank = [e[gi] if gi < len(e) else None for e in everyone]
        if all(x is None for x in per_rank):
            layout.append(None)
            index.append(None)
            continue
        without = [r for r, x in enumerate(per_rank) if x is None]
        if without:
            raise CheckpointError(
                f"param group {gi} has a process_group on some ranks but not on ranks {without}: pass every rank "
                "its expert-data-parallel group, or none on every rank")
        groups = sorted({ranks for ranks, _ in per_rank})
        covered = sorted(r for ranks in groups for r in ranks)
        if covered != list(range(world)):
            raise CheckpointError(
                f"the process groups of param group {gi} ({[list(x) for x in groups]}) do not partition the "
                f"{world} ranks: every rank must be in exactly one expert-data-parallel group")
        if len(groups) == 1:
            layout.append(None)
            index.append(None)
            continue
        shapes = {ranks: sig for ranks, sig in per_rank}
        if any(shapes[x] != shapes[groups[0]] for x in groups):
            raise CheckpointError(
                f"param group {gi}: the expert groups {[list(x) for x in groups]} hold parameters of different "
                "shapes or dtypes; every expert group must hold the same parameters (its own values)")
        layout.append({"count": len(groups), "ranks": [list(x) for x in groups]})
        index.append(groups.index(mine[gi][0]))
    return layout, index


def _param_keys(optimizer: torch.optim.Optimizer, names: dict[Tensor, str],
                index: list[int | None]) -> dict[Tensor, str]:
    """The checkpoint key (name, with ``@ep<k>`` for expert params) of every parameter of the optimizer."""
    return {p: _ep_name(names[p], index[gi]) for gi, g in enumerate(optimizer.param_groups) for p in g["params"]}


def _check_layout(path: str, saved: list | None, now: list[dict | None]) -> None:
    """The number of expert groups of every param group must be the one it was saved with (the ranks in each,
    i.e. the expert data parallelism, may differ: each group reshards its own tensors)."""
    saved = saved or [None] * len(now)
    for gi, (s, c) in enumerate(zip(saved, now)):
        ns, nc = (s or {}).get("count", 1), (c or {}).get("count", 1)
        if ns != nc:
            raise CheckpointError(
                f"{path}: param group {gi} was saved with {ns} expert groups"
                f"{' (ranks ' + str(s['ranks']) + ')' if s else ''}, {nc} here"
                f"{' (ranks ' + str(c['ranks']) + ')' if c else ''}: load with the same number of expert groups "
                "(expert-parallel size; the number of ranks per expert group may differ), or export the checkpoint "
                "with export_consolidated and redistribute the experts")


# ------------------------------------------------------------------------------------------------ integrity
def _crc32(path: str) -> int:
    """CRC-32 of a file, read into one reused 4 MiB buffer (fresh 16 MiB reads kept two chunks alive at once)."""
    crc = 0
    buf = bytearray(1 << 22)
    view = memoryview(buf)
    with open(path, "rb") as f:
        while True:
            n = f.readinto(buf)
            if not n:
                return crc
            crc = zlib.crc32(view[:n], crc)


def _file_table(directory: str, names: list[str]) -> dict[str, dict[str, int]]:
    return {n: {"size": os.path.getsize(os.path.join(directory, n)), "crc32": _crc32(os.path.join(directory, n))} for n in names}


def _verify_files(path: str, table: dict[str, dict[str, int]], share: tuple[int, int]) -> list[str]:
    rank, world = share
    problems = []
    for k, (name, want) in enumerate(sorted(table.items())):
        if k % world != rank:
            continue
        f = os.path.join(path, name)
        if not os.path.exists(f):
            problems.append(f"{name}: missing")
            continue
        size = os.path.getsize(f)
        if size != want["size"]:
            problems.append(f"{name}: {size} bytes, expected {want['size']} (truncated or overwritten)")
        elif _crc32(f) != want["crc32"]:
            problems.append(f"{name}: CRC-32 mismatch (corrupt)")
    return problems


def _read_meta(path: str) -> dict:
    meta_path = os.path.join(path, META_FILE)
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: no such checkpoint directory")
    if not os.path.exists(meta_path):
        raise CheckpointError(
            f"{path} is not a complete zeroadamw checkpoint ({META_FILE} is missing: the save did not finish, "
            "or this is not our checkpoint)"
        )
    try:
        with open(meta_path) as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{meta_path} is unreadable or corrupt: {e}") from e
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{meta_path} is not a zeroadamw checkpoint description")
    if meta.get("version", 0) > VERSION:
        raise CheckpointError(f"{path} was written by a newer zeroadamw (format {meta['version']} > {VERSION})")
    return meta


def _recover(path: str) -> None:
    """Finish a swap that a crash interrupted: ``path`` missing but a complete old/new copy beside it."""
    path = os.path.abspath(path)
    if os.path.exists(path):
        return
    parent, name = os.path.split(path)
    if not os.path.isdir(parent):
        return
    for prefix in (f".{name}.old-", f".{name}.tmp-"):
        for cand in sorted(os.listdir(parent)):
            full = os.path.join(parent, cand)
            if cand.startswith(prefix) and os.path.exists(os.path.join(full, META_FILE)):
                os.rename(full, path)
                warnings.warn(f"zeroadamw: recovered checkpoint {path} from {cand} (an interrupted save)")
                return


# -------------------------------------------------------------------------------------------------- save
def _model_entries(model: torch.nn.Module, expert_of: dict[int, tuple[int, int]]) -> tuple[dict, dict, dict]:
    """DCP entries of the model's tensors, their JSON description, and the names stored per expert group
    (``name -> param group``); ``expert_of`` maps ``id(param) -> (param group, this rank's k)``."""
    state: dict[str, Any] = {}
    tensors: dict[str, dict] = {}
    per_group: dict[str, int] = {}
    as_vars = model.state_dict(keep_vars=True) if expert_of else {}
    for k, t in model.state_dict().items():
        if not isinstance(t, Tensor):
            raise TypeError(f"model state {k!r} is not a tensor")
        ep = expert_of.get(id(as_vars.get(k)))
        if ep is not None:
            per_group[k] = ep[0]
        state[f"model/{_ep_name(k, ep[1] if ep else None)}"] = t.detach()
        tensors[k] = {"shape": list(t.shape), "dtype": _dtype_name(t.dtype)}
    return state, tensors, per_group


def _prepare_tmp(parent: str, name: str, path: str, tmp: str) -> None:
    os.makedirs(parent, exist_ok=True)
    _recover(path)
    for stale in os.listdir(parent):  # leftovers of crashed saves of this checkpoint
        if stale.startswith((f".{name}.tmp-", f".{name}.old-")):
            shutil.rmtree(os.path.join(parent, stale), ignore_errors=True)
    os.makedirs(tmp)


def _write_meta(directory: str, meta: dict) -> None:
    part = os.path.join(directory, META_FILE + ".part")
    with open(part, "w") as f:
        json.dump(meta, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(part, os.path.join(directory, META_FILE))


def _commit(parent: str, name: str, path: str, tmp: str, token: str, meta: dict) -> None:
    """Rank 0: write ``zeroadamw.json`` into the finished temporary directory and swap it in for ``path``. On a
    failure, put the previous checkpoint back (if it was moved aside) and delete the temporary directory."""
    old = os.path.join(parent, f".{name}.old-{token}")
    moved = False
    try:
        _write_meta(tmp, meta)
        if os.path.exists(path):
            os.rename(path, old)
            moved = True
        os.rename(tmp, path)
    except BaseException:
        try:
            if moved and not os.path.exists(path):  # the swap was half done: the previous checkpoint goes back
                os.rename(old, path)
            if os.path.exists(tmp):
                shutil.rmtree(tmp, ignore_errors=True)
        except Exception:  # noqa: BLE001 - the first error is the one to report; the next load/save repairs
            pass
        raise
    _fsync_dir(parent)
    if moved:
        shutil.rmtree(old, ignore_errors=True)


def save(
    path: str | os.PathLike,
    model: torch.nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    extra: dict | None = None,
    *,
    max_file_bytes: int = 2**26,
    save_model: bool = True,
) -> None:
    """Write a checkpoint of ``model``, ``optimizer``, ``scheduler`` and ``extra`` to ``path``, atomically.

    A collective when ``torch.distributed`` is initialised (every rank calls it with the same path); works in one
    process without it. Each rank writes only the optimizer state it owns, in files of at most
    ``max_file_bytes`` (default 64 MiB; DCP holds a CPU copy of one file's tensors while writing it), and
    computes the size and CRC-32 of its own files. ``extra``: JSON-serialisable values and tensors (rank 0's copy
    is saved), returned by :func:`load`. ``save_model=False`` uses ``model`` only to name the optimizer's
    parameters (e.g. inside a HF Trainer checkpoint, which saves the weights itself).

    A failure on any rank (writing, checksumming, rank 0's metadata write or swap) raises the same
    :class:`CheckpointError` on every rank; the checkpoint previously at ``path`` is left as it was.
    """
    path = os.path.abspath(os.fspath(path))
    parent, name = os.path.split(path)
    if model is None and optimizer is None:
        raise ValueError("nothing to save: pass model= and/or optimizer=")
    if isinstance(optimizer, ShardedAdamW):
        optimizer.wait_params()  # overlap_param_gather: the weights saved are the updated ones
    state: dict[str, Any] = {}
    meta: dict[str, Any] = {"format": FORMAT, "version": VERSION, "world_size": dist.get_world_size() if _dist() else 1,
                            "created": time.time(), "model": None, "optimizer": None, "scheduler": None}
    expert_of: dict[int, tuple[int, int]] = {}
    if optimizer is not None:
        names = _param_names(model, optimizer)
        layout, index = _expert_layout(optimizer)
        keys = _param_keys(optimizer, names, index)
        expert_of = {id(p): (gi, index[gi]) for gi, g in enumerate(optimizer.param_groups)
                     if index[gi] is not None for p in g["params"]}
        meta["expert_groups"] = {"param_groups": layout, "tensors": {}}
    if model is not None and save_model:
        entries, tensors, per_group = _model_entries(model, expert_of)
        state.update(entries)
        meta["model"] = {"tensors": tensors}
        if optimizer is not None:
            meta["expert_groups"]["tensors"] = per_group
    local_max_step = 0.0
    if optimizer is not None:
        if _sharded(optimizer):
            entries, desc = _sharded_entries(optimizer, names, keys)
            kind = "ShardedAdamW"
        else:
            entries, desc = _plain_entries(optimizer, names, keys)
            kind = type(optimizer).__name__
        state.update(entries)
        local_max_step = max((float((v.local if isinstance(v, _Range) else v).max()) for k, v in entries.items()
                              if k.endswith("/step") and (not isinstance(v, _Range) or v.local.numel())), default=0.0)
        meta["optimizer"] = {"class": kind, "param_groups": _groups_json(optimizer, names), "params": desc,
                             "max_step": local_max_step}
        if _sharded(optimizer):
            meta["optimizer"].update(stage=optimizer.stage, bucket_size=optimizer.bucket_size,
                                     master_dtype=_dtype_name(optimizer.master_dtype) if optimizer.master_dtype else None,
                                     state_dtype=optimizer.state_dtype, kahan_sum=optimizer.kahan_sum)
    if scheduler is not None:
        meta["scheduler"] = _jsonable(scheduler.state_dict(), "scheduler.state_dict()")
    if extra is not None:
        extra_tensors: dict[str, Tensor] = {}
        meta["extra"] = _split_extra(extra, "", extra_tensors)
        if _rank() == 0:  # rank 0's extra is the one saved (JSON and tensors alike)
            state.update(extra_tensors)

    rank0 = _rank() == 0
    token = _broadcast_obj(uuid.uuid4().hex[:12] if rank0 else None)
    tmp = os.path.join(parent, f".{name}.tmp-{token}")
    _agreed(path, "preparing the temporary directory",
            (lambda: _prepare_tmp(parent, name, path, tmp)) if rank0 else None)
    writer = _BoundedWriter(tmp, max_file_bytes)

    def write() -> tuple[dict, float]:
        _quiet(dcp.save, state, storage_writer=writer, planner=_SavePlanner(), no_dist=not _dist())
        own = list(writer.written)
        if rank0 and os.path.exists(os.path.join(tmp, ".metadata")):
            own.append(".metadata")  # DCP's metadata: written by the coordinator (rank 0) before dcp.save returns
        return _file_table(tmp, own), local_max_step

    try:  # every rank checksums the files it wrote; the tables and any failure reach every rank
        written = _agreed(path, "writing and checksumming the shards", write)
    except CheckpointError:
        if rank0:  # every rank is past writing: the temporary directory is debris
            shutil.rmtree(tmp, ignore_errors=True)
        raise

    def commit() -> None:
        files: dict[str, dict[str, int]] = {}
        for table, _ in written:
            files.update(table)
        try:
            unclaimed = sorted(f for f in os.listdir(tmp) if f not in files and f not in (META_FILE, META_FILE + ".part"))
            files.update(_file_table(tmp, unclaimed))  # nothing expected here; but never leave a file unchecked
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        meta["files"] = dict(sorted(files.items()))
        if meta["optimizer"] is not None:
            meta["optimizer"]["max_step"] = max(m for _, m in written)
        _commit(parent, name, path, tmp, token, meta)

    _agreed(path, "writing the metadata and swapping the checkpoint in (rank 0)", commit if rank0 else None)


def _fsync_dir(d: str) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# -------------------------------------------------------------------------------------------------- load
def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise CheckpointError(msg)


def _validate(path: str, meta: dict, model, optimizer, names) -> None:
    if model is not None:
        _check(meta.get("model") is not None, f"{path} has no model state; pass model=None")
        saved = meta["model"]["tensors"]
        current = {k: t for k, t in model.state_dict().items()}
        missing = sorted(set(saved) - set(current))
        unexpected = sorted(set(current) - set(saved))
        _check(not missing and not unexpected,
               f"{path}: the model's tensors differ from the checkpoint's -- in the checkpoint only: "
               f"{missing[:8]}{' ...' if len(missing) > 8 else ''}; in the model only: "
               f"{unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
        for k, t in current.items():
            _check(list(t.shape) == saved[k]["shape"],
                   f"{path}: {k} has shape {tuple(saved[k]['shape'])} in the checkpoint, {tuple(t.shape)} in the model")
    if optimizer is not None:
        om = meta.get("optimizer")
        _check(om is not None, f"{path} holds no optimizer state; pass optimizer=None to load the model only "
                               "(the optimizer then starts fresh -- usually a mistake when resuming)")
        groups = om["param_groups"]
        _check(len(groups) == len(optimizer.param_groups),
               f"{path}: {len(groups)} param groups in the checkpoint, {len(optimizer.param_groups)} in the optimizer")
        for gi, (g, sg) in enumerate(zip(optimizer.param_groups, groups)):
            cur = [names[p] for p in g["params"]]
            if cur != sg["params"]:
                only_ckpt = sorted(set(sg["params"]) - set(cur))[:5]
                only_opt = sorted(set(cur) - set(sg["params"]))[:5]
                raise CheckpointError(
                    f"{path}: param group {gi} lists different parameters (checkpoint only: {only_ckpt}, optimizer "
                    f"only: {only_opt}, or a different order); build the optimizer with the groups it was saved with")
        if isinstance(optimizer, ShardedAdamW):
            from .options import validate_hyper

            for gi, (g, sg) in enumerate(zip(optimizer.param_groups, groups)):
                merged = dict(g)
                merged.update({k: _unjson(v) for k, v in sg.items() if k != "params"})
                if isinstance(merged.get("betas"), list):
                    merged["betas"] = tuple(merged["betas"])
                try:
                    validate_hyper(merged, f" (param group {gi} of {path})")
                except (TypeError, ValueError) as e:
                    raise CheckpointError(str(e)) from e
        for g in optimizer.param_groups:
            for p in g["params"]:
                d = om["params"].get(names[p])
                if d is not None:
                    _check(list(p.shape) == d["shape"],
                           f"{path}: optimizer state of {names[p]} has shape {tuple(d['shape'])}, the param {tuple(p.shape)}")


def load(
    path: str | os.PathLike,
    model: torch.nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    *,
    verify: bool = True,
    load_model: bool = True,
) -> Any:
    """Load a checkpoint written by :func:`save` (at any world size and bucket size) in place; return ``extra``.

    A collective when ``torch.distributed`` is initialised. Restores the model *and* the optimizer; with
    ``optimizer=None`` while the checkpoint holds optimizer state, the model's params are marked so that a
    ShardedAdamW starting fresh on them warns. ``verify=False`` skips the CRC-32 check (sizes are always checked).
    ``load_model=False`` uses ``model`` only to name the optimizer's parameters (its weights are not touched).
    Expert groups (param groups with a ``process_group``) load their own tensors; their number must be the one
    saved, the ranks per expert group may differ.
    """
    if isinstance(optimizer, ShardedAdamW):
        optimizer.wait_params()  # no deferred all-gather may land on the loaded weights
    path = os.path.abspath(os.fspath(path))
    _agreed(path, "recovering an interrupted save (rank 0)", (lambda: _recover(path)) if _rank() == 0 else None,
            op="loading", as_is=True, gather=False)

    def read_and_validate() -> tuple[dict, dict | None]:
        meta = _read_meta(path)
        names = _param_names(model, optimizer) if optimizer is not None else None
        _validate(path, meta, model if load_model else None, optimizer, names)
        return meta, names

    meta, names = _agreed(path, "reading and validating its description", read_and_validate,
                          op="loading", as_is=True, gather=False)
    saved_layout = meta.get("expert_groups") or {}
    ep_tensors: dict[str, int] = saved_layout.get("tensors") or {}
    index: list[int | None] = []
    if optimizer is not None:
        layout, index = _expert_layout(optimizer)
        _check_layout(path, saved_layout.get("param_groups"), layout)
    elif load_model and model is not None and ep_tensors:
        raise CheckpointError(
            f"{path} holds {len(ep_tensors)} model tensors per expert group (e.g. {sorted(ep_tensors)[:3]}); pass "
            "optimizer= too: its param groups' process groups say which expert group's tensors this rank loads")
    share = (dist.get_rank(), dist.get_world_size()) if _dist() else (0, 1)
    table = meta.get("files") or {}
    _check(bool(table), f"{path}/{META_FILE} lists no files")
    if verify:
        problems = _verify_files(path, table, share)
    else:
        problems = [f"{n}: size differs" for n, w in table.items()
                    if not os.path.exists(os.path.join(path, n)) or os.path.getsize(os.path.join(path, n)) != w["size"]]
    problems = [p for ps in _all_gather_obj(problems) for p in ps]
    if problems:
        raise CheckpointError(f"{path} is damaged: " + "; ".join(sorted(set(problems))))

    dest: dict[str, Any] = {}
    if model is not None and load_model:
        for k, t in model.state_dict().items():
            dest[f"model/{_ep_name(k, index[ep_tensors[k]] if k in ep_tensors else None)}"] = t
    opt_meta = meta.get("optimizer")
    fill_master: list = []
    keys: dict[Tensor, str] = {}
    if optimizer is not None:
        keys = _param_keys(optimizer, names, index)
        if _sharded(optimizer):
            dest.update(_sharded_dests(path, optimizer, names, keys, opt_meta, fill_master))
        else:
            dest.update(_plain_dests(optimizer, names, keys, opt_meta))
    if meta.get("extra") is not None:
        extra_dest: dict[str, Tensor] = {}
        _extra_dests(meta["extra"], extra_dest)
        dest.update(extra_dest)
    try:  # DCP reads each chunk on the CPU and copies it into the destination (any device), in place
        _quiet(dcp.load, dest, storage_reader=dcp.FileSystemReader(path), planner=_LoadPlanner(), no_dist=not _dist())
    except Exception as e:  # noqa: BLE001 - name the checkpoint in whatever DCP raised
        raise CheckpointError(f"{path}: reading the checkpoint failed: {type(e).__name__}: {e}") from e

    if optimizer is not None:
        _apply_hyper(optimizer, opt_meta)
        if _sharded(optimizer):
            _restore_sharded(optimizer, names, opt_meta, fill_master)
        else:
            _apply_plain(optimizer, names, keys, opt_meta, dest)
        if model is not None:
            for p in model.parameters():
                if hasattr(p, RESUMED_ATTR):
                    delattr(p, RESUMED_ATTR)
    elif model is not None and load_model and opt_meta is not None and opt_meta.get("max_step", 0) > 0:
        for p in model.parameters():
            setattr(p, RESUMED_ATTR, opt_meta["max_step"])
    if scheduler is not None:
        _check(meta.get("scheduler") is not None, f"{path} holds no scheduler state; pass scheduler=None")
        scheduler.load_state_dict(_unjson(meta["scheduler"]))
    if meta.get("extra") is None:
        return None
    return _join_extra(meta["extra"], {k: dest[k] for k in dest if k.startswith("extra/")})


def _sharded_dests(path: str, optimizer: ShardedAdamW, names, keys, opt_meta: dict, fill_master: list) -> dict:
    """Where DCP reads a ShardedAdamW's state into (its own views); checks kinds and shapes against the saved
    description first. Params saved without a master go to ``fill_master`` (taken from the loaded weights)."""
    entries, desc = _sharded_entries(optimizer, names, keys)
    key_of = {names[p]: k for p, k in keys.items()}
    for fqn, d in desc.items():
        key = key_of[fqn]
        saved = opt_meta["params"].get(fqn)
        if saved is None:  # trainable now, had no state then: fresh
            for kind in d["kinds"]:
                entries.pop(f"optim/{key}/{kind}", None)
            continue
        for kind in d["kinds"]:
            if kind in saved["kinds"] and (saved["kinds"][kind]["dtype"] == "uint8") != (d["kinds"][kind]["dtype"] == "uint8"):
                raise CheckpointError(
                    f"{path}: {fqn} {kind!r} was saved as {saved['kinds'][kind]['dtype']}, this optimizer keeps "
                    f"{d['kinds'][kind]['dtype']} (another state_dtype): load with the state_dtype it was saved with, "
                    "or export_consolidated(...) it and load that with optimizer.load_state_dict (which converts)")
            if kind not in saved["kinds"]:
                if kind == "master":  # saved without a master (fp32 run): take it from the loaded param
                    entries.pop(f"optim/{key}/master", None)
                    fill_master.append(fqn)
                    continue
                if kind == "kahan_comp":  # saved with an fp32 master or none: start the compensation at zero
                    entries.pop(f"optim/{key}/kahan_comp", None)
                    fill_master.append(("kahan", fqn))
                    continue
                raise CheckpointError(
                    f"{path}: {fqn} has no {kind!r} state in the checkpoint (saved by rule "
                    f"{saved.get('rule')!r}, loading into rule {optimizer.rule!r})")
            if saved["kinds"][kind]["shape"] != d["kinds"][kind]["shape"]:
                raise CheckpointError(
                    f"{path}: {fqn} {kind!r} has shape {saved['kinds'][kind]['shape']} in the checkpoint, "
                    f"{d['kinds'][kind]['shape']} here (another optimizer class or grouping)")
    return entries


def _restore_sharded(optimizer: ShardedAdamW, names, opt_meta: dict, fill_master: list) -> None:
    """After DCP filled a ShardedAdamW's views: masters to re-read, fresh state for params saved without any."""
    by_name = {names[p]: p for g in optimizer.param_groups for p in g["params"]}
    for entry in fill_master:
        if isinstance(entry, tuple):  # ("kahan", fqn): no compensation in the checkpoint
            optimizer.state[by_name[entry[1]]]["kahan_comp"].zero_()
    for fqn, p in by_name.items():
        if p in optimizer.engine.where and optimizer.engine.where[p][0].master is not None:
            # no master in the checkpoint: take it from the (loaded) param
            optimizer._master_loaded(p, fqn not in fill_master)
    for fqn, p in by_name.items():
        if p in optimizer.engine.where and fqn not in opt_meta["params"]:
            optimizer._reset_param_state(p)  # trainable now, no state then: fresh, as load_state_dict does
    optimizer._mark_state_loaded()


def _apply_hyper(optimizer: torch.optim.Optimizer, opt_meta: dict) -> None:
    for g, sg in zip(optimizer.param_groups, opt_meta["param_groups"]):
        for k, v in sg.items():
            if k == "params":
                continue
            v = _unjson(v)
            if k == "betas" and isinstance(v, list):
                v = tuple(v)
            g[k] = v


def _plain_dests(optimizer, names, keys, opt_meta) -> dict[str, Tensor]:
    dests: dict[str, Tensor] = {}
    for g in optimizer.param_groups:
        for p in g["params"]:
            d = opt_meta["params"].get(names[p])
            if d is None:
                continue
            for kind, k in d["kinds"].items():
                if kind == "step":
                    if k["shape"]:
                        raise CheckpointError(f"{names[p]}: per-row steps are SparseAdamW state; load it into that optimizer")
                    dests[f"optim/{keys[p]}/step"] = torch.zeros((), dtype=torch.float32)
                    continue
                if not k["sharded"] or k["shape"] != list(p.shape):
                    raise CheckpointError(f"{names[p]}: {kind!r} is {d.get('rule')} state; load it into that optimizer")
                if is_dtensor(p):  # FSDP2: read this rank's flat range only
                    lo, shape = _dtensor_range(p)
                    dests[f"optim/{keys[p]}/{kind}"] = _Range(torch.empty(math.prod(shape), dtype=_dtype(k["dtype"])),
                                                              lo, p.numel())
                else:
                    dests[f"optim/{keys[p]}/{kind}"] = torch.empty(p.numel(), dtype=_dtype(k["dtype"]))
    return dests


def _shaped_like(p: Tensor, t: Any) -> Tensor:
    """A loaded flat entry shaped like ``p`` (an FSDP2 param: its local range, as a DTensor like ``p``)."""
    if not isinstance(t, _Range):
        return t.view(p.shape)
    from torch.distributed.tensor import DTensor

    _, shape = _dtensor_range(p)
    return DTensor.from_local(t.local.view(shape).to(local(p).device), p.device_mesh, p.placements,
                              run_check=False, shape=p.shape, stride=p.stride())


def _apply_plain(optimizer, names, keys, opt_meta, loaded) -> None:
    """Build a torch-format state dict from what was read and hand it to ``optimizer.load_state_dict``."""
    state = {}
    index = 0
    groups = []
    for g, sg in zip(optimizer.param_groups, opt_meta["param_groups"]):
        ids = []
        for p in g["params"]:
            d = opt_meta["params"].get(names[p])
            if d is not None:
                st = {kind: _shaped_like(p, loaded[f"optim/{keys[p]}/{kind}"]) for kind in d["kinds"]
                      if kind not in ("master", "step")}
                st["step"] = loaded[f"optim/{keys[p]}/step"]
                state[index] = st
            ids.append(index)
            index += 1
        groups.append({**{k: (tuple(v) if k == "betas" else _unjson(v)) for k, v in sg.items() if k != "params"},
                       "params": ids})
    optimizer.load_state_dict({"state": state, "param_groups": groups})


# ----------------------------------------------------------------------------------------------- export
def export_consolidated(ckpt_dir: str | os.PathLike, out_dir: str | os.PathLike, *, verify: bool = True) -> dict[str, str]:
    """Offline, one process, bounded memory: write ``out_dir/optimizer.pt`` (a ``torch.optim.AdamW`` state dict,
    loadable with ``weights_only=True``) and ``out_dir/model.safetensors`` from a checkpoint of any world size.

    Tensors are read from the checkpoint one at a time and streamed to the output files, so peak memory is about
    one parameter's state, not the whole state (measured in benchmarks/checkpoint_memory.py).

    **Expert groups.** A checkpoint saved with ``n > 1`` expert groups (param groups with a ``process_group``)
    holds ``n`` different tensors per expert parameter name. They are exported under distinguishable names:
    ``model.safetensors`` has ``<name>@ep<k>`` for ``k`` in ``[0, n)`` (expert group ``k`` = the ``k``-th
    group by smallest global rank, as in ``zeroadamw.json``'s ``expert_groups``) instead of ``<name>``; in
    ``optimizer.pt`` such a param group becomes ``n`` consecutive param groups, one per expert group, each with
    ``"expert_group": k``; and every param group then carries ``"param_names"`` (``<name>`` or ``<name>@ep<k>``)
    naming the tensor each of its indices stands for. Checkpoints without expert groups export as before (no
    suffixes, no ``param_names``).
    """
    from ._streaming import SafetensorsStreamWriter, TorchSaveStreamWriter

    ckpt_dir = os.path.abspath(os.fspath(ckpt_dir))
    out_dir = os.fspath(out_dir)
    _recover(ckpt_dir)
    meta = _read_meta(ckpt_dir)
    if verify:
        problems = _verify_files(ckpt_dir, meta.get("files") or {}, (0, 1))
        if problems:
            raise CheckpointError(f"{ckpt_dir} is damaged: " + "; ".join(problems))
    os.makedirs(out_dir, exist_ok=True)
    reader_path = ckpt_dir
    out: dict[str, str] = {}
    layout = meta.get("expert_groups") or {}
    ep_groups = layout.get("param_groups") or []
    ep_tensors = layout.get("tensors") or {}

    def copies(gi: int) -> list[int | None]:  # the expert-group suffixes of param group gi's tensors
        g = ep_groups[gi] if gi < len(ep_groups) else None
        return list(range(g["count"])) if g else [None]

    def read(key: str, shape: list[int], dtype: torch.dtype) -> Tensor:
        t = torch.empty(shape, dtype=dtype) if key.endswith("/step") or not key.startswith("optim/") else torch.empty(
            math.prod(shape), dtype=dtype)
        _quiet(dcp.load, {key: t}, storage_reader=dcp.FileSystemReader(reader_path), planner=_LoadPlanner(), no_dist=True)
        return t

    def read_full(key: str, shape: list[int], dtype: torch.dtype) -> Tensor:
        t = torch.empty(shape, dtype=dtype)
        _quiet(dcp.load, {key: t}, storage_reader=dcp.FileSystemReader(reader_path), planner=_LoadPlanner(), no_dist=True)
        return t

    if meta.get("model") is not None:
        tensors = {_ep_name(k, c): v for k, v in meta["model"]["tensors"].items()
                   for c in (copies(ep_tensors[k]) if k in ep_tensors else [None])}
        path = os.path.join(out_dir, "model.safetensors")
        with SafetensorsStreamWriter(path, {k: (v["shape"], _dtype(v["dtype"])) for k, v in tensors.items()},
                                     metadata={"format": "pt"}) as w:
            for k, v in tensors.items():
                w.write(k, read(f"model/{k}", v["shape"], _dtype(v["dtype"])))
        out["model"] = path
    om = meta.get("optimizer")
    if om is not None:
        path = os.path.join(out_dir, "optimizer.pt")
        named = any(ep_groups)
        with TorchSaveStreamWriter(path) as w:
            state = {}
            index = 0
            groups = []
            for gi, sg in enumerate(om["param_groups"]):
                for c in copies(gi):
                    ids = []
                    for fqn in sg["params"]:
                        d = om["params"].get(fqn)
                        if d is not None:
                            entry = _export_param_state(w, _ep_name(fqn, c), d, read, read_full)
                            if entry is not None:
                                state[index] = entry
                        ids.append(index)
                        index += 1
                    g = {**{k: (tuple(v) if k == "betas" else _unjson(v)) for k, v in sg.items() if k != "params"},
                         "params": ids}
                    if named:
                        g["param_names"] = [_ep_name(fqn, c) for fqn in sg["params"]]
                    if c is not None:
                        g["expert_group"] = c
                    groups.append(g)
            w.finish({"state": state, "param_groups": groups})
        out["optimizer"] = path
    return out


def _export_param_state(w, key: str, d: dict, read, read_full) -> dict | None:
    """One parameter's state (stored under ``optim/<key>/``) streamed into the torch-format writer; ``None`` when
    it was never updated (torch has no state for it then)."""
    sk = d["kinds"].get("step", {"shape": [], "dtype": "float32"})
    step = read_full(f"optim/{key}/step", sk["shape"], _dtype(sk["dtype"]))
    if float(step.max()) <= 0:
        return None
    entry = {}
    for kind, k in d["kinds"].items():
        if kind == "step":
            t = step
        elif kind.endswith("_absmax") or kind == "kahan_comp":
            continue  # int8 scales are folded into their moment below; the compensation is not torch state
        elif k["sharded"]:
            t = read(f"optim/{key}/{kind}", k["shape"], _dtype(k["dtype"])).view(k["shape"])
        else:
            t = read_full(f"optim/{key}/{kind}", k["shape"], _dtype(k["dtype"]))
        if kind in ("exp_avg", "exp_avg_sq") and t.dtype == torch.uint8:  # int8 moments: dequantized
            a = d["kinds"][kind + "_absmax"]
            absmax = read(f"optim/{key}/{kind}_absmax", a["shape"], _dtype(a["dtype"]))
            t = quant.dequantize_tensor(t, absmax, kind == "exp_avg")
        elif kind in ("exp_avg", "exp_avg_sq") and t.dtype != torch.float32 and t.is_floating_point():
            t = t.float()  # bf16 moments: torch AdamW's fp32
        entry[kind] = w.tensor(t)
        del t
    return entry
