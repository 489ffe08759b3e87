#!/usr/bin/env bash
# The GPU tier: one command, from the repository root, on a machine with one CUDA GPU; at most 8 minutes.
#   bash scripts/gpu_check.sh
# Needs no network and no install: zeroadamw is imported from src/ (PYTHONPATH). Wheels put in scripts/wheels/
# (e.g. bitsandbytes, lomo-optim) are pip-installed first, from that folder only. Writes $OUT/gpu_report.jsonl,
# $OUT/gpu_report.md and $OUT/logs/ (OUT defaults to ./out/gpu). Always exits 0: the report says what failed.
# Knobs: PYTHON=<interpreter with torch>, GPU_CHECK_BUDGET_S (default 440), GPU_CHECK_TEST_TIMEOUT_S (default 120).
set -u
cd "$(dirname "$0")/.."
export OUT="${OUT:-$PWD/out/gpu}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src:$PWD/scripts/gpu${PYTHONPATH:+:$PYTHONPATH}"
export ZEROADAMW_STRICT_DEVICE="${ZEROADAMW_STRICT_DEVICE:-1}"
export GPU_CHECK_BUDGET_S="${GPU_CHECK_BUDGET_S:-440}"
budget="$GPU_CHECK_BUDGET_S"

py=""
for cand in ${PYTHON:-} python python3 .venv/bin/python; do
  if command -v "$cand" >/dev/null 2>&1 && "$cand" -c "import torch" >/dev/null 2>&1; then py="$cand"; break; fi
done
if [ -z "$py" ]; then
  echo '{"section": "env", "name": "python", "status": "fail", "summary": "no python that imports torch (set PYTHON=...)"}' >> "$OUT/gpu_report.jsonl"
  printf '# GPU tier report\n\n**Not run**: no python interpreter that imports torch was found (set PYTHON=...).\n' > "$OUT/gpu_report.md"
  cat "$OUT/gpu_report.md"
  exit 0
fi
echo "gpu_check: $(command -v "$py"), budget ${budget}s, OUT=$OUT"

# the orchestrator keeps to the budget itself; this is the backstop should it hang
timeout -k 10 "$((budget + 25))" "$py" scripts/gpu_check.py
rc=$?
if [ "$rc" -ne 0 ]; then
  echo "{\"section\": \"run\", \"name\": \"orchestrator\", \"status\": \"error\", \"summary\": \"scripts/gpu_check.py exited with $rc (124/137: killed by the backstop timeout)\"}" >> "$OUT/gpu_report.jsonl"
  timeout 30 "$py" scripts/gpu_check.py --report-only || true
fi
exit 0
