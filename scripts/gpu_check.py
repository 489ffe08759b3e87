#!/usr/bin/env python3
"""The GPU tier in one command: run it from the repository root on a machine with one CUDA GPU.

    bash scripts/gpu_check.sh            # what to run; it calls this with the right interpreter and PYTHONPATH
    python scripts/gpu_check.py --report-only    # rebuild gpu_report.md from gpu_report.jsonl
    python scripts/gpu_check.py --cpu-smoke      # the harness itself on CPU, tiny sizes (numbers meaningless)

Sections, in order, each in its own process group with its own time limit (killed, group and all, when it runs
past it), all inside one overall budget (``GPU_CHECK_BUDGET_S``, default 440 s: the tier must finish in 8 minutes).
A section that fails, crashes or times out is recorded -- status, reason and the tail of its log -- and the next
one runs; a section that no longer fits in the budget is recorded as not run.

1. ``env``      nvidia-smi, torch / CUDA / NCCL and library versions, a CUDA smoke test (scripts/gpu/env_info.py)
2. ``wheels``   ``pip install --no-index --find-links scripts/wheels scripts/wheels/*.whl`` when wheels are there
3. ``pytest``   ``pytest -q -m cuda tests/test_cuda.py`` with a per-test limit (one JSON line per test)
4. ``mem``      peak memory + step time of a ~1B LLaMA step, one process per optimizer (scripts/gpu/mem_step.py)
5. ``adalomo``  ShardedAdamW(rule="adalomo") vs lomo_optim.AdaLomo when installed (scripts/gpu/adalomo.py)
6. ``qlora``    launch/finetune_llama.py --qlora's first steps when bitsandbytes is installed (scripts/gpu/qlora.py)

Output: ``$OUT/gpu_report.jsonl`` (one JSON object per result), ``$OUT/gpu_report.md`` (the summary) and
``$OUT/logs/<section>.log``; ``OUT`` defaults to ./out/gpu. Always exits 0: the report says what failed.
"""

from __future__ import annotations

import datetime
import glob
import json
import os
import signal
import subprocess
import sys
import time
import traceback

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
GPU = os.path.join(ROOT, "scripts", "gpu")
sys.path.insert(0, GPU)

from common import RESULT_TAG  # noqa: E402
import report  # noqa: E402

OUT = os.path.abspath(os.environ.get("OUT") or os.path.join(ROOT, "out", "gpu"))
REPORT = os.path.join(OUT, "gpu_report.jsonl")
LOGS = os.path.join(OUT, "logs")
BUDGET = float(os.environ.get("GPU_CHECK_BUDGET_S") or 440)
PYTEST_TEST_LIMIT = float(os.environ.get("GPU_CHECK_TEST_TIMEOUT_S") or 120)
START = time.monotonic()
RESERVE = 12.0  # seconds kept for writing the report
SMOKE = "--cpu-smoke" in sys.argv  # every section on CPU with tiny sizes: to develop this script without a GPU


def elapsed() -> float:
    return time.monotonic() - START


def remaining() -> float:
    return BUDGET - elapsed()


def record(section: str, name: str, status: str, summary: str = "", seconds: float | None = None,
           error: str = "", data: dict | None = None) -> None:
    rec = {"section": section, "name": name, "status": status, "summary": summary}
    if seconds is not None:
        rec["seconds"] = round(seconds, 1)
    if data:
        rec["data"] = data
    if error:
        rec["error"] = error[-4000:]
    with open(REPORT, "a") as f:
        f.write(json.dumps(rec, default=str) + "\n")
    print(f"[{elapsed():5.0f}s] {section}/{name}: {status}" + (f" -- {summary}" if summary else ""), flush=True)


def child_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    paths = [os.path.join(ROOT, "src"), GPU] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    env.setdefault("ZEROADAMW_STRICT_DEVICE", "1")
    for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        env.setdefault(k, "1")  # no network there: fail fast instead of waiting on connection timeouts
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("WANDB_DISABLED", "true")
    env["PYTHONUNBUFFERED"] = "1"
    env["OUT"] = OUT
    env.update(extra)
    return env


def run_proc(name: str, argv: list[str], limit: float, env: dict | None = None) -> tuple[int | None, float, str]:
    """Run ``argv`` in its own process group, output to logs/<name>.log; kill the group past ``limit`` seconds.
    Returns (exit code or None on timeout, seconds, log path)."""
    log = os.path.join(LOGS, f"{name}.log")
    t0 = time.monotonic()
    with open(log, "w") as fh:
        fh.write(f"$ {' '.join(argv)}\n(limit {limit:.0f} s)\n")
        fh.flush()
        proc = subprocess.Popen(argv, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, env=env or child_env(),
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=max(1.0, limit))
        except subprocess.TimeoutExpired:
            rc = None
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    proc.wait(timeout=5)
                    break
                except subprocess.TimeoutExpired:
                    continue
    try:  # children of a killed (or finished) leader may linger in the group
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    return rc, time.monotonic() - t0, log


def tail(path: str, n: int = 40) -> str:
    """The last ``n`` lines of a log, without the GPU_RESULT lines (they are in the report already)."""
    try:
        with open(path, errors="replace") as f:
            return "".join([ln for ln in f.readlines() if not ln.startswith(RESULT_TAG)][-n:])
    except OSError as e:
        return f"(no log: {e})"


def results_in(path: str) -> list[dict]:
    out = []
    try:
        with open(path, errors="replace") as f:
            for line in f:
                if line.startswith(RESULT_TAG):
                    try:
                        out.append(json.loads(line[len(RESULT_TAG):]))
                    except json.JSONDecodeError:
                        pass
    except OSError:
        pass
    return out


def budget_for(section: str, name: str, want: float, least: float) -> float | None:
    limit = min(want, remaining() - RESERVE)
    if limit < least:
        record(section, name, "not_run", f"time budget: {remaining():.0f} s left of {BUDGET:.0f}, needs >= {least:.0f}")
        return None
    return limit


def script_section(section: str, name: str, argv: list[str], want: float, least: float = 20.0) -> list[dict]:
    """Run a section script; record each GPU_RESULT it printed, or the failure (with the log's tail)."""
    limit = budget_for(section, name, want, least)
    if limit is None:
        return []
    rc, secs, log = run_proc(f"{section}_{name}", argv, limit)
    found = results_in(log)
    for r in found:
        status = r.get("status", "error")
        err = tail(log) if status in report.BAD else ""
        if rc not in (0,) and status not in report.BAD:
            status, err = "fail", tail(log)
            r["summary"] = f"exit code {rc} after the result: " + r.get("summary", "")
        record(section, r.get("name", name), status, r.get("summary", ""), secs / max(1, len(found)),
               error=err, data=r.get("data"))
    if not found:
        if rc is None:
            record(section, name, "timeout", f"killed after {limit:.0f} s", secs, error=tail(log))
        else:
            record(section, name, "fail", f"exit code {rc}, no result", secs, error=tail(log))
    return found


# ------------------------------------------------------------------------------------------------- sections
def section_env() -> bool:
    found = script_section("env", "env", [sys.executable, os.path.join(GPU, "env_info.py")], 90, 10)
    print(tail(os.path.join(LOGS, "env_env.log"), 80), flush=True)
    return bool(found) and bool(found[0].get("data", {}).get("cuda_available"))


def section_wheels() -> None:
    wheels = sorted(glob.glob(os.path.join(ROOT, "scripts", "wheels", "*.whl")))
    if not wheels:
        record("wheels", "install", "info", "no scripts/wheels/*.whl: nothing to install")
        return
    limit = budget_for("wheels", "install", 150, 20)
    if limit is None:
        return
    argv = [sys.executable, "-m", "pip", "install", "--no-index", "--find-links",
            os.path.join(ROOT, "scripts", "wheels"), *wheels]
    rc, secs, log = run_proc("wheels_install", argv, limit)
    names = [os.path.basename(w) for w in wheels]
    if rc == 0:
        record("wheels", "install", "pass", f"installed {len(wheels)} wheel(s)", secs, data={"wheels": names})
    else:
        record("wheels", "install", "timeout" if rc is None else "fail", f"pip exit code {rc}", secs,
               error=tail(log), data={"wheels": names})


def section_pytest() -> None:
    limit = budget_for("pytest", "tests/test_cuda.py", 250, 40)
    if limit is None:
        return
    import importlib.util

    have_timeout = importlib.util.find_spec("pytest_timeout") is not None
    argv = [sys.executable, "-m", "pytest", "-q", "-rA", "-m", "cuda", "tests/test_cuda.py",
            "-p", "gpu_pytest_plugin", "-p", "no:cacheprovider"]
    if have_timeout:
        argv += ["--timeout", f"{PYTEST_TEST_LIMIT:.0f}"]
    env = child_env(GPU_REPORT=REPORT, GPU_PYTEST_TIMEOUT="0" if have_timeout else f"{PYTEST_TEST_LIMIT:.0f}")
    rc, secs, log = run_proc("pytest", argv, limit, env)
    last = [ln for ln in tail(log, 5).splitlines() if ln.strip()]
    summary = last[-1].strip("= ") if last else ""
    per_test = f"per-test limit {PYTEST_TEST_LIMIT:.0f} s ({'pytest-timeout' if have_timeout else 'gpu_pytest_plugin'})"
    if rc is None:
        record("pytest", "tests/test_cuda.py", "timeout", f"pytest killed after {limit:.0f} s; {per_test}", secs,
               error=tail(log, 60))
    elif rc == 0 and " passed" not in f" {summary}":
        record("pytest", "tests/test_cuda.py", "skip", f"no test ran: {summary}; {per_test}", secs)
    elif rc == 0:
        record("pytest", "tests/test_cuda.py", "pass", f"{summary}; {per_test}", secs)
    else:
        # rc 1: some tests failed (each has its own record); anything else: pytest itself had a problem
        record("pytest", "tests/test_cuda.py", "fail", f"exit code {rc}: {summary}; {per_test}", secs,
               error=tail(log, 60) if rc != 1 else "")


def section_mem() -> None:
    import mem_step

    tiny = ["--device", "cpu", "--hidden", "64", "--layers", "2", "--intermediate", "128", "--vocab", "300",
            "--heads", "4", "--kv-heads", "4", "--seq", "32", "--steps", "2", "--warmup", "1"] if SMOKE else []
    for variant in mem_step.VARIANTS:
        script_section("mem", variant, [sys.executable, os.path.join(GPU, "mem_step.py"), "--variant", variant, *tiny],
                       75, 30)


def section_adalomo() -> None:
    script_section("adalomo", "adalomo_vs_lomo_optim",
                   [sys.executable, os.path.join(GPU, "adalomo.py"), *(["--device", "cpu"] if SMOKE else [])], 90, 15)


def section_qlora() -> None:
    smoke = ["--cpu-lora-smoke", "--steps", "2", "--block-size", "64"] if SMOKE else []
    script_section("qlora", "qlora_first_steps", [sys.executable, os.path.join(GPU, "qlora.py"), *smoke], 150, 15)


def main(argv: list[str]) -> int:
    os.makedirs(LOGS, exist_ok=True)
    if "--report-only" in argv:
        print(report.build(OUT))
        return 0
    if os.path.exists(REPORT):
        os.replace(REPORT, REPORT + ".prev")
    started = datetime.datetime.now().isoformat(timespec="seconds")
    record("run", "start", "info", started,
           data={"budget_s": BUDGET, "python": sys.executable, "started": started, "root": ROOT, "out": OUT})
    cuda = False
    try:
        cuda = section_env() or SMOKE
    except Exception:  # noqa: BLE001 - the orchestrator itself must never stop the run
        record("env", "orchestrator", "error", "the env section raised in gpu_check.py", error=traceback.format_exc())
    plan = [("wheels", section_wheels, False), ("pytest", section_pytest, False), ("mem", section_mem, True),
            ("adalomo", section_adalomo, True), ("qlora", section_qlora, True)]
    for name, fn, needs_cuda in plan:
        if needs_cuda and not cuda:
            record(name, name, "not_run", "no usable CUDA device (see the env section)")
            continue
        try:
            fn()
        except Exception:  # noqa: BLE001
            record(name, "orchestrator", "error", f"gpu_check.py's {name} section raised", error=traceback.format_exc())
    record("run", "end", "info", f"{elapsed():.0f} s", seconds=elapsed())
    try:
        print("\n" + report.build(OUT), flush=True)
    except Exception:  # noqa: BLE001
        traceback.print_exc()
    print(f"report: {os.path.join(OUT, 'gpu_report.md')} and {REPORT}", flush=True)
    return 0


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except Exception:  # noqa: BLE001
        traceback.print_exc()
    sys.exit(0)
