#!/usr/bin/env bash
# One command installs everything: apt build deps for FFCV (as root), a venv with
# torch 2.14.1 + torchvision 0.29.1, DALI, FFCV and this project (editable) with its dev tools.
set -euo pipefail
cd "$(dirname "$0")/.."
APT_DEPS="pkg-config libturbojpeg0-dev libopencv-dev"
PY=${PYTHON:-python3}

missing=()
for p in $APT_DEPS; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    echo "setup: installing ${missing[*]} (apt, for FFCV)"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  else
    echo "setup: FFCV needs these system packages; install them, then re-run make setup:" >&2
    echo "  sudo apt-get install -y ${missing[*]}" >&2
    exit 2
  fi
fi

[ -x .venv/bin/python ] || "$PY" -m venv .venv
pipq() {  # quiet pip; on failure show the log's end (minus the local-index noise) and stop
  .venv/bin/pip install -q "$@" >.venv/pip.log 2>&1 ||
    { grep -v '^WARNING: Location' .venv/pip.log | tail -30 >&2; echo "setup: pip install $* failed" >&2; exit 1; }
}
pipq --upgrade pip wheel setuptools
pipq torch==2.14.1 torchvision==0.29.1
pipq -e ".[dali,ffcv,dev]"
.venv/bin/python - <<'PY'
import torch, torchvision, numpy
import nvidia.dali, ffcv
print(f"setup: ok (torch {torch.__version__}, torchvision {torchvision.__version__}, "
      f"dali {nvidia.dali.__version__}, ffcv {ffcv.__version__}, numpy {numpy.__version__})")
PY
