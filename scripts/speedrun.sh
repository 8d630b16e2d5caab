#!/usr/bin/env bash
# The main job: set up ./.venv if needed, then `lmforge speedrun` on the built-in
# corpus (about 15 minutes on 2 CPU cores). Extra arguments go to the command,
# e.g. `scripts/speedrun.sh --minutes 5 --name quick`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/lmforge speedrun "$@"
