#!/usr/bin/env bash
# Install torch into the given interpreter's environment *before* anything that depends on it, so that pip
# never resolves torch on its own (on CPU-only machines a plain resolve pulls a multi-GB CUDA build).
#   - torch >= 2.11 already importable (e.g. your CUDA build, or a venv made with --system-site-packages): keep it
#     (an older one is replaced as below: zeroadamw needs torch >= 2.11, and pip would otherwise resolve an
#     upgrade itself -- the multi-GB CUDA build on a CPU-only machine);
#   - ZEROADAMW_TORCH set: install exactly that spec (e.g. "torch==2.11.0" or "torch --index-url ...");
#   - an NVIDIA GPU is visible (nvidia-smi): the default (CUDA) torch from PyPI;
#   - otherwise: torch==2.13.0, the CPU wheel these machines carry locally (on other CPU-only machines add
#     ZEROADAMW_TORCH="torch --index-url https://download.pytorch.org/whl/cpu").
set -euo pipefail
py="${1:-python3}"
min="2.11"  # keep in step with pyproject.toml and zeroadamw.MIN_TORCH
if "$py" -c "import re, sys, torch; m = re.match(r'(\d+)\.(\d+)', torch.__version__); sys.exit(not m or (int(m[1]), int(m[2])) < tuple(map(int, '$min'.split('.'))))" >/dev/null 2>&1; then
  echo "install_torch: keeping installed torch $("$py" -c 'import torch; print(torch.__version__)')"
  exit 0
elif "$py" -c "import torch" >/dev/null 2>&1; then
  echo "install_torch: installed torch $("$py" -c 'import torch; print(torch.__version__)') is older than $min; replacing it"
fi
if [ -n "${ZEROADAMW_TORCH:-}" ]; then
  # shellcheck disable=SC2086
  "$py" -m pip install -q ${ZEROADAMW_TORCH}
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  "$py" -m pip install -q torch
else
  "$py" -m pip install -q "torch==2.13.0"
fi
"$py" -c "import torch; print('install_torch: torch', torch.__version__, 'cuda' if torch.cuda.is_available() else 'cpu')"
