"""Run a function on N real ``torch.distributed`` (gloo) processes and collect what each rank returns.

``run(fn, world_size, *args)`` spawns ``world_size`` fresh interpreters (the ``spawn`` start method, as torchrun
would), initialises a gloo process group over a file store in a temporary directory, calls
``fn(rank, world_size, *args)`` in each, and returns the list of per-rank return values (anything
``torch.save`` can write). An exception on any rank fails the call with that rank's traceback; a rank that does
not finish within ``timeout`` seconds (a hang: mismatched collectives) fails it too, and all ranks are killed.

``fn`` must be importable by name (defined at module level in a test module or helper).
"""

from __future__ import annotations

import os
import tempfile
import time
import traceback

import torch
import torch.multiprocessing as mp


def _worker(rank, world_size, fn, args, store_path, out_dir, env, init):
    os.environ.update(env)
    if not init:  # torchrun-style environment; the code under test initialises the process group itself
        os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                          LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    import torch.distributed as dist

    out = os.path.join(out_dir, f"rank{rank}.pt")
    try:
        if init:
            dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world_size)
        result = fn(rank, world_size, *args)
        torch.save({"ok": True, "result": result}, out)
    except BaseException:  # noqa: BLE001 - report everything to the parent, which raises it
        torch.save({"ok": False, "error": traceback.format_exc()}, out)
        os._exit(1)  # don't wait on peers that may be stuck in a collective with us
    if dist.is_initialized():
        dist.destroy_process_group()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(fn, world_size: int, *args, timeout: float = 300.0, env: dict[str, str] | None = None,
        init: bool = True) -> list:
    """``init=False``: don't create the process group; set RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT as
    torchrun does (for code that initialises it itself, like transformers / accelerate)."""
    env = dict(env or {})
    if not init:
        env.setdefault("MASTER_PORT", str(_free_port()))
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "store")
        ctx = mp.get_context("spawn")
        procs = [
            ctx.Process(target=_worker, args=(r, world_size, fn, args, store, tmp, env, init), daemon=False)
            for r in range(world_size)
        ]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
        hung = [r for r, p in enumerate(procs) if p.is_alive()]
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
        results, errors = [], []
        for r in range(world_size):
            path = os.path.join(tmp, f"rank{r}.pt")
            if not os.path.exists(path):
                errors.append(f"rank {r}: no result (exit code {procs[r].exitcode})")
                results.append(None)
                continue
            rec = torch.load(path, weights_only=False)
            if rec["ok"]:
                results.append(rec["result"])
            else:
                errors.append(f"rank {r}:\n{rec['error']}")
                results.append(None)
        if hung:
            raise TimeoutError(f"ranks {hung} did not finish within {timeout:.0f} s (a hang?)\n" + "\n".join(errors))
        if errors:
            raise RuntimeError("\n".join(errors))
        return results
