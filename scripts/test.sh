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
# Mesa's EGL, for the test that renders Meta-World through EGL (a GPU node's backend) in env workers on this CPU
if ! ldconfig -p | grep libEGL_mesa >/dev/null; then  # not -q: its early exit fails the pipe (pipefail)
  echo "[test] installing libegl1 and libegl-mesa0 with apt-get (the EGL rendering test)" >&2
  SUDO=$([ "$(id -u)" = 0 ] || echo sudo)
  $SUDO apt-get update -qq && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    libegl1 libegl-mesa0 >/dev/null
fi
.venv/bin/ruff check .
# The docs site, strict: a broken link or a page missing from the nav fails here
DOCS_SITE=$(mktemp -d)
NO_MKDOCS_2_WARNING=1 .venv/bin/mkdocs build --strict --quiet --site-dir "$DOCS_SITE"
rm -rf "$DOCS_SITE"
# Two xdist workers, one torch thread each (tests/conftest.py), tests sent one at a time, longest first
.venv/bin/python -m pytest -q -n 2 --maxschedchunk 1 --durations=12 "$@"
