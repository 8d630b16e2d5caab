#!/usr/bin/env bash
# The tests: set up ./.venv with the test tools if needed, then run pytest.
# Extra arguments go to pytest, e.g. `scripts/test.sh -m "not slow"`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev
# The browser for the web UI's test (tests/serve/test_serve_ui.py, skipped without one).
if ! command -v chromium >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "[test] installing chromium"
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } ||
    echo "[test] could not install chromium: the web UI's test will be skipped"
fi
exec .venv/bin/python -m pytest "$@"
