"""Turn the GPU tier's gpu_report.jsonl into gpu_report.md (also: ``python scripts/gpu/report.py OUT_DIR``)."""

from __future__ import annotations

import json
import os
import sys

BAD = ("fail", "timeout", "error")


def load(path: str) -> list[dict]:
    recs = []
    try:
        with open(path) as f:
            for line in f:
                line = line.strip()
                if not line:
                    continue
                try:
                    recs.append(json.loads(line))
                except json.JSONDecodeError:
                    recs.append({"section": "report", "name": "unreadable line", "status": "error",
                                 "summary": line[:200]})
    except OSError as e:
        recs.append({"section": "report", "name": "gpu_report.jsonl", "status": "error", "summary": str(e)})
    return recs


def _cell(x) -> str:
    return str(x if x is not None else "").replace("|", "\\|").replace("\n", " ")


def _gib(b) -> str:
    return f"{b / 2**30:.2f}" if isinstance(b, (int, float)) else ""


def build(out_dir: str) -> str:
    recs = load(os.path.join(out_dir, "gpu_report.jsonl"))
    lines = ["# GPU tier report", ""]
    start = next((r for r in recs if r.get("section") == "run" and r.get("name") == "start"), None)
    end = next((r for r in recs if r.get("section") == "run" and r.get("name") == "end"), None)
    env = next((r for r in recs if r.get("section") == "env" and r.get("name") == "env"), None)
    if start:
        d = start.get("data", {})
        lines.append(f"Started {d.get('started', '?')}, budget {d.get('budget_s', '?')} s, python {d.get('python', '?')}.")
    if end:
        lines.append(f"Finished after {end.get('seconds', '?')} s.")
    else:
        lines.append("**The run did not finish** (no end record): the report below is what was written before it stopped.")
    if env:
        d = env.get("data", {})
        lines += ["", "## Machine", "", "| | |", "|---|---|"]
        for k in ("nvidia_smi", "devices", "capability", "memory_total_gib", "torch", "torch_cuda", "cudnn", "nccl",
                  "python", "transformers", "accelerate", "peft", "bitsandbytes", "lomo_optim", "pytest",
                  "pytest_timeout", "zeroadamw", "git_commit", "smoke"):
            if k in d:
                lines.append(f"| {k} | {_cell(d[k])} |")
    counts: dict[str, int] = {}
    for r in recs:
        if r.get("status") in ("info",):
            continue
        counts[r.get("status", "?")] = counts.get(r.get("status", "?"), 0) + 1
    lines += ["", "## Summary", "", ", ".join(f"{v} {k}" for k, v in sorted(counts.items())) or "nothing recorded", ""]
    lines += ["| section | check | status | s | result |", "|---|---|---|---|---|"]
    for r in recs:
        if r.get("status") == "info" and r.get("section") in ("run",):
            continue
        lines.append(f"| {_cell(r.get('section'))} | {_cell(r.get('name'))} | **{_cell(r.get('status'))}** | "
                     f"{_cell(r.get('seconds'))} | {_cell(r.get('summary'))[:240]} |")
    collected = next((r for r in recs if r.get("section") == "pytest" and r.get("name") == "collected"), None)
    if collected:
        done = {r.get("name") for r in recs if r.get("section") == "pytest"}
        missing = [t for t in collected.get("data", {}).get("tests", []) if t not in done]
        if missing:
            lines += ["", f"**{len(missing)} collected tests have no result** (the pytest run ended early):", ""]
            lines += [f"- `{t}`" for t in missing]
    mem = [r for r in recs if r.get("section") == "mem" and r.get("status") == "ok"]
    if mem:
        cfg = mem[0].get("data", {}).get("config", {})
        p = mem[0].get("data", {}).get("params")
        lines += ["", "## Memory and step time (one training step, ~1B LLaMA)", "",
                  f"{p / 1e9 if p else 0:.2f}B params, config {cfg}. GiB of `torch.cuda.max_memory_allocated`.", "",
                  "| optimizer | model GiB | first-step peak GiB | steady peak GiB | state GiB | step ms (median / min / max) |",
                  "|---|---|---|---|---|---|"]
        for r in mem:
            d = r.get("data", {})
            lines.append(f"| {r.get('name')} | {_gib(d.get('model_bytes'))} | {_gib(d.get('first_step_peak_bytes'))} | "
                         f"{_gib(d.get('steady_peak_bytes'))} | {_gib(d.get('state_bytes'))} | "
                         f"{d.get('step_ms', 0):.1f} / {d.get('step_ms_min', 0):.1f} / {d.get('step_ms_max', 0):.1f} |")
        peaks = {r["name"]: r["data"].get("steady_peak_bytes") for r in mem}
        if {"step_in_backward", "stage2", "torch_adamw_fused"} <= peaks.keys():
            s, z, t = peaks["step_in_backward"], peaks["stage2"], peaks["torch_adamw_fused"]
            lines += ["", f"Ordering (steady peak): step_in_backward < stage2: {s < z}; stage2 <= torch: {z <= t} "
                      "(ShardedAdamW keeps an fp32 master + fp32 moments, torch bf16 moments: compare the "
                      "`*_bf16_state` rows with torch)."]
    bad = [r for r in recs if r.get("status") in BAD]
    if bad:
        lines += ["", "## Failures", ""]
        for r in bad:
            lines += [f"### {r.get('section')}: {r.get('name')} ({r.get('status')})", "", _cell(r.get("summary")), ""]
            if r.get("error"):
                lines += ["```", str(r["error"])[-4000:], "```", ""]
    text = "\n".join(lines) + "\n"
    with open(os.path.join(out_dir, "gpu_report.md"), "w") as f:
        f.write(text)
    return text


if __name__ == "__main__":
    print(build(sys.argv[1] if len(sys.argv) > 1 else os.environ.get("OUT", "out/gpu")))
