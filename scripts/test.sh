#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite, lint included.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# Debian's chromium and its driver, for the test that opens the analysis report in a real headless browser
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
  echo "[test] installing chromium and chromium-driver with apt-get (the report test's browser)" >&2
  SUDO=$([ "$(id -u)" = 0 ] || echo sudo)
  $SUDO apt-get update -qq && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    chromium chromium-driver >/dev/null
fi
.venv/bin/ruff check .
.venv/bin/python -m pytest -q --durations=12 "$@"
