#!/usr/bin/env bash
# Create .venv with mowbench and the exact tested versions (constraints.txt). Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! ldconfig -p 2>/dev/null | grep -q libOSMesa; then
  echo "[setup] libosmesa6 missing (needed for Meta-World rendering on CPU); installing with apt-get" >&2
  if [ "$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libosmesa6 >/dev/null
  else sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libosmesa6 >/dev/null; fi
fi
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q torch==2.13.0  # first, alone: the CPU wheel where one is provided
.venv/bin/python -m pip install -q -c constraints.txt -e ".[test,docs]"
