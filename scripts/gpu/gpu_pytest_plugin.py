"""pytest plugin of the GPU tier (``-p gpu_pytest_plugin``, scripts/gpu on the path).

* One JSON line per test into ``$GPU_REPORT`` (the run's gpu_report.jsonl) as soon as the test ends, so a run that
  is killed half-way still reports every test it finished; plus the list of collected tests first, so the report
  can name the tests that never ran.
* A per-test time limit of ``$GPU_PYTEST_TIMEOUT`` seconds when pytest-timeout is not installed (the GPU machine
  may lack it): SIGALRM fails the test; a hang inside C code that the alarm cannot interrupt dumps every thread's
  stack and ends the run 30 s later (faulthandler), which the orchestrator then reports.
"""

from __future__ import annotations

import faulthandler
import json
import os
import signal
import sys

import pytest

REPORT = os.environ.get("GPU_REPORT")
LIMIT = float(os.environ.get("GPU_PYTEST_TIMEOUT") or 0)


def _write(rec: dict) -> None:
    if not REPORT:
        return
    with open(REPORT, "a") as f:
        f.write(json.dumps(rec, default=str) + "\n")


def pytest_collection_finish(session):
    _write({"section": "pytest", "name": "collected", "status": "info",
            "summary": f"{len(session.items)} tests collected", "data": {"tests": [i.nodeid for i in session.items]}})


def pytest_runtest_logreport(report):
    failed_phase = report.when in ("setup", "teardown") and report.outcome == "failed"
    if not (report.when == "call" or failed_phase or (report.when == "setup" and report.outcome == "skipped")):
        return
    status = {"passed": "pass", "failed": "fail", "skipped": "skip"}[report.outcome]
    if hasattr(report, "wasxfail"):
        status = "xfail" if report.outcome == "skipped" else "xpass"
    summary = ""
    if report.outcome == "skipped" and isinstance(report.longrepr, tuple):
        summary = str(report.longrepr[2])
    elif report.outcome == "failed":
        crash = getattr(report.longrepr, "reprcrash", None)
        summary = (crash.message if crash is not None else report.longreprtext.strip().splitlines()[-1:] or [""])
        summary = summary if isinstance(summary, str) else summary[0]
        summary = summary.splitlines()[0][:300] if summary else ""
        if failed_phase:
            summary = f"[{report.when}] {summary}"
    _write({"section": "pytest", "name": report.nodeid, "status": status, "seconds": round(report.duration, 2),
            "summary": summary, "data": dict(report.user_properties),
            "error": report.longreprtext[-4000:] if report.outcome == "failed" else ""})


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    if LIMIT <= 0 or item.config.pluginmanager.hasplugin("timeout") and item.config.getoption("timeout", None):
        yield
        return

    def on_alarm(signum, frame):
        raise TimeoutError(f"test ran past the GPU tier's per-test limit of {LIMIT:.0f} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, LIMIT)
    faulthandler.dump_traceback_later(LIMIT + 30, exit=True, file=sys.stderr)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        faulthandler.cancel_dump_traceback_later()
