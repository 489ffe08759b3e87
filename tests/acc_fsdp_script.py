"""What tests/test_fsdp_accelerate.py runs under ``accelerate launch`` with an FSDP2 config (one process per rank):

    ACCELERATE_USE_CPU=true accelerate launch --config_file configs/accelerate_fsdp2_cpu.yaml --num_processes 2 \
        tests/acc_fsdp_script.py --out DIR

The real Accelerate FSDP2 path: the optimizer is built on the plain model, then ``accelerator.prepare(model,
optimizer)`` ``fully_shard``-s the model and swaps the optimizer's params for the DTensor shards. Every run trains
a tiny LlamaForCausalLM (tests/helpers.py, no download) on the same batches:

* ``torch``: torch.optim.AdamW(fused=True) with ``accelerator.clip_grad_norm_``, the reference (our impl="auto" on
  CPU is the same fused kernel); ``torch_nn_clip``: the same with ``torch.nn.utils.clip_grad_norm_`` (params in
  param-group order);
* ``ShardedAdamW``, ``AdamW`` (zeroadamw.AdamW), ``SparseAdamW``: ``accelerator.clip_grad_norm_``, against ``torch``;
* ``ShardedAdamW_own_clip``: ShardedAdamW(max_grad_norm=...) clips itself, against ``torch_nn_clip``;
* the ``--resume`` runs call ``accelerator.save_state`` after ``--save_at`` steps (DCP: SHARDED_STATE_DICT) and go
  on; ``resume_<name>`` then builds fresh copies (another init seed), ``accelerator.load_state`` and trains the
  remaining steps: it must end where the uninterrupted run ended.

Each rank writes ``DIR/rank<r>.json``: per run, the worst relative difference (max|a - b| / max|b|) of the local
param shards against the reference after every step, of the local optimizer-state shards at the end, whether the
state is held as DTensors, the norms; an ``error`` (the traceback) where a run raised. Nothing is asserted here.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # helpers.py (accelerate launch runs us as a file)

from helpers import llama_batch, llama_loss, param_groups, tiny_llama  # noqa: E402

OURS = ("ShardedAdamW", "AdamW", "SparseAdamW", "ShardedAdamW_own_clip")


def make_accelerator():
    """``Accelerator()`` from the launcher's environment, FSDP2 as the config says. Accelerate (1.16) builds the FSDP
    plugin from the config on CPU too but applies FSDP only on accelerator devices (a CPU run is MULTI_CPU): switch
    the (process-wide) AcceleratorState to FSDP there; on GPUs it already is."""
    from accelerate import Accelerator, PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin, InitProcessGroupKwargs

    acc = Accelerator(kwargs_handlers=[InitProcessGroupKwargs(timeout=datetime.timedelta(seconds=180))])
    if (acc.distributed_type == DistributedType.MULTI_CPU
            and os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"):
        plugin = FullyShardedDataParallelPlugin()  # from the FSDP_* variables the launcher set
        if acc.mixed_precision != "no":
            plugin.set_mixed_precision(acc.mixed_precision)  # as AcceleratorState does (MixedPrecisionPolicy)
        acc.state.fsdp_plugin = plugin
        acc.state.distributed_type = DistributedType.FSDP
        # what AcceleratorState does on GPUs: every later AcceleratorState() copies it back from PartialState
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    if not acc.is_fsdp2:
        raise RuntimeError(f"not an FSDP2 run: {acc.distributed_type}; launch with configs/accelerate_fsdp2*.yaml")
    return acc


def build_optimizer(name, model, clip):
    import zeroadamw

    groups = param_groups(model)  # two groups (decay / no decay, another lr), a frozen param (the final norm)
    if name in ("torch", "torch_nn_clip"):
        return torch.optim.AdamW(groups, fused=True)
    if name == "ShardedAdamW_own_clip":
        return zeroadamw.ShardedAdamW(groups, max_grad_norm=clip)
    return getattr(zeroadamw, name)(groups)


def local(t):
    return t.to_local() if hasattr(t, "to_local") else t


def snapshot_params(model):
    return {n: local(p).detach().clone().float().cpu() for n, p in model.named_parameters()}


def snapshot_state(model, opt):
    """{param name: {exp_avg, exp_avg_sq: local shards; step: float}} and the state tensors' type names."""
    out, kinds = {}, set()
    for n, p in model.named_parameters():
        st = opt.state.get(p) or {}
        if not st:
            continue
        entry = {}
        for k, v in st.items():
            if isinstance(v, torch.Tensor) and k != "step":
                kinds.add(f"{k}:{type(v).__name__}")
                entry[k] = local(v).detach().clone().float().cpu()
            elif k == "step":
                entry[k] = float(v)
        out[n] = entry
    return out, sorted(kinds)


def rel(a, b):
    d = (a.double() - b.double()).abs().max().item() if a.numel() else 0.0
    m = b.double().abs().max().item() if b.numel() else 0.0
    return d / m if m > 0 else d


def params_err(a, b):
    if a.keys() != b.keys():
        raise AssertionError(f"param names differ: {sorted(a)} vs {sorted(b)}")
    return max(rel(a[n], b[n]) for n in a)


def state_err(a, b):
    """Worst relative difference of the moments and absolute one of the steps; inf when the params holding state
    differ (e.g. nothing was loaded)."""
    if a.keys() != b.keys():
        return float("inf")
    worst = 0.0
    for n in b:
        for k in ("exp_avg", "exp_avg_sq"):
            worst = max(worst, rel(a[n][k], b[n][k]))
        worst = max(worst, abs(a[n]["step"] - b[n]["step"]))
    return worst


def train(name, args, rank, start=0, load_from=None, save_to=None, seed=0):
    """One run: its own Accelerator, model and optimizer; snapshots of the local shards after every step."""
    acc = make_accelerator()
    model = tiny_llama(seed=seed)
    opt = build_optimizer(name, model, args.clip)
    model, aopt = acc.prepare(model, opt)  # FSDP2: fully_shard, then the optimizer's params become the DTensors
    rec = {"params": {}, "norms": [], "our_norms": [], "optimizer_type": type(opt).__name__,
           "param_types": sorted({type(p).__name__ for g in opt.param_groups for p in g["params"]}),
           "param_dtypes": sorted({str(p.dtype) for g in opt.param_groups for p in g["params"]}),
           "compute_dtype": str(getattr(acc.state.fsdp_plugin.mixed_precision_policy, "param_dtype", None))}
    if load_from is not None:
        acc.load_state(load_from)
        rec["loaded_params"] = snapshot_params(model)
        rec["loaded_state"], _ = snapshot_state(model, opt)
    for step in range(start, args.steps):
        ids = llama_batch(step, rank).to(acc.device)
        acc.backward(llama_loss(model, ids))
        if name == "torch_nn_clip":  # in param-group order, the order ShardedAdamW sums the norms in
            ordered = [p for g in opt.param_groups for p in g["params"]]
            rec["norms"].append(float(torch.nn.utils.clip_grad_norm_(ordered, args.clip)))
        elif name != "ShardedAdamW_own_clip":
            rec["norms"].append(float(acc.clip_grad_norm_(model.parameters(), args.clip)))
        aopt.step()
        aopt.zero_grad()
        if hasattr(opt, "grad_norm"):
            rec["our_norms"].append(float(opt.grad_norm))
        rec["params"][step + 1] = snapshot_params(model)
        if save_to is not None and step + 1 == args.save_at:
            acc.save_state(save_to)
            rec["saved_state"], _ = snapshot_state(model, opt)
    rec["state"], rec["state_kinds"] = snapshot_state(model, opt)
    rec["fsdp_mode"] = getattr(opt, "_fsdp", None)
    acc.wait_for_everyone()
    return rec


def compare(rec, ref):
    return {"param_err": [params_err(rec["params"][s], ref["params"][s]) for s in sorted(ref["params"])],
            "state_err": state_err(rec["state"], ref["state"]), "state_kinds": rec["state_kinds"],
            "param_types": rec["param_types"], "norms": rec["norms"], "our_norms": rec["our_norms"],
            "ref_norms": ref["norms"], "fsdp_mode": rec["fsdp_mode"], "optimizer_type": rec["optimizer_type"],
            "error": None}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--save_at", type=int, default=5)
    ap.add_argument("--clip", type=float, default=0.5)
    ap.add_argument("--names", default=",".join(OURS))
    ap.add_argument("--resume", default="ShardedAdamW,AdamW,SparseAdamW",
                    help="runs that save_state after --save_at steps and are resumed by load_state ('' for none)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    rank = int(os.environ.get("RANK", "0"))
    os.makedirs(args.out, exist_ok=True)
    names = [n for n in args.names.split(",") if n]
    resume = [n for n in args.resume.split(",") if n in names]
    result = {"world_size": int(os.environ.get("WORLD_SIZE", "1")), "runs": {}, "timings": {}}
    refs = {}
    for ref_name in ("torch", "torch_nn_clip"):  # accelerator.clip_grad_norm_ / torch.nn.utils.clip_grad_norm_
        t0 = time.time()
        refs[ref_name] = train(ref_name, args, rank)
        result["timings"][ref_name] = time.time() - t0
        result["runs"][ref_name] = {k: refs[ref_name][k] for k in ("norms", "param_types", "state_kinds",
                                                                    "param_dtypes", "compute_dtype")}
    full = {}
    for name in names:
        t0 = time.time()
        ckpt = os.path.join(args.out, f"ckpt_{name}") if name in resume else None
        try:
            full[name] = train(name, args, rank, save_to=ckpt)
            # ShardedAdamW(max_grad_norm=...) clips as torch.nn.utils.clip_grad_norm_ over its param groups does
            # (a norm summed in another param order, e.g. model.parameters(), may differ in the last bit)
            ref = refs["torch_nn_clip" if name == "ShardedAdamW_own_clip" else "torch"]
            result["runs"][name] = compare(full[name], ref)
        except Exception:  # noqa: BLE001 - reported to the test, which says what broke
            result["runs"][name] = {"error": traceback.format_exc()}
        result["timings"][name] = time.time() - t0
    for name in resume:
        t0 = time.time()
        done = full.get(name)
        if done is None or "saved_state" not in done:
            result["runs"][f"resume_{name}"] = {"error": f"the uninterrupted {name} run did not save"}
            continue
        try:  # fresh copies (another init seed: only load_state can make them equal), load_state, go on
            rec = train(name, args, rank, start=args.save_at, load_from=os.path.join(args.out, f"ckpt_{name}"),
                        seed=1)
            result["runs"][f"resume_{name}"] = {
                "loaded_param_err": params_err(rec["loaded_params"], done["params"][args.save_at]),
                "loaded_state_err": state_err(rec["loaded_state"], done["saved_state"]),
                "loaded_state_entries": len(rec["loaded_state"]), "saved_state_entries": len(done["saved_state"]),
                "param_err": [params_err(rec["params"][s], done["params"][s]) for s in sorted(rec["params"])],
                "state_err": state_err(rec["state"], done["state"]), "state_kinds": rec["state_kinds"],
                "error": None}
        except Exception:  # noqa: BLE001
            result["runs"][f"resume_{name}"] = {"error": traceback.format_exc()}
        result["timings"][f"resume_{name}"] = time.time() - t0
    with open(os.path.join(args.out, f"rank{rank}.json"), "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
