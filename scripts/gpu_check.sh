#!/usr/bin/env bash
# The checks that need a CUDA GPU, in one go (CI has none): lmforge's CUDA tests, the speedrun on the GPU,
# the training loop's other tests with the GPU as their default device, and the training benchmark
# against transformers. Logs go to the folder given (default gpu-check/); docs/BENCHMARKS.md records runs.
#
#     bash scripts/gpu_check.sh [LOG_DIR] [SPEEDRUN_MINUTES]
#
# Uses the python on PATH, which must hold a CUDA build of torch and lmforge's dependencies (the repo's
# src/ is put on PYTHONPATH, so lmforge itself need not be installed). Before a GPU session, the same tests
# as a CPU dry run: `LMFORGE_CUDA_TESTS=cpu .venv/bin/python -m pytest tests/test_cuda.py`.
set -uo pipefail
cd "$(dirname "$0")/.."
logs=${1:-gpu-check}
minutes=${2:-1.5}
mkdir -p "$logs"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; \
print('torch', torch.__version__, 'on', torch.cuda.get_device_name())" || exit 1

echo "== CUDA tests"
timeout 300 python3 -m pytest -p no:cacheprovider tests/test_cuda.py -v -rs 2>&1 | tee "$logs/cuda_tests.log" | \
  grep -E "PASSED|FAILED|ERROR|SKIPPED|passed|failed"

echo "== the training loop's tests, the GPU their default device (in the background)"
timeout 240 python3 -m pytest -p no:cacheprovider tests/train/test_train_loop.py tests/test_finetune.py -q \
  > "$logs/train_tests.log" 2>&1 &
tests=$!

echo "== speedrun on the built-in corpus, $minutes minutes"
runs=$(mktemp -d)
timeout 420 python3 -c "from lmforge.cli import main; raise SystemExit(main())" speedrun --minutes "$minutes" \
  --runs-dir "$runs" --progress false > "$logs/speedrun.log" 2>&1
echo "speedrun exit $?"; grep -E "^\[speedrun\]" "$logs/speedrun.log"
cp "$runs/speedrun/report.md" "$logs/speedrun_report.md" 2>/dev/null; rm -rf "$runs"
wait $tests; echo "train tests exit $?"; tail -3 "$logs/train_tests.log"

echo "== training throughput: lmforge vs transformers, gpu-125m"
timeout 300 python3 benchmarks/train.py --device cuda --preset gpu-125m --batch-size 16 --seq-len 512 --steps 5 \
  --compile 2>&1 | grep -v Warning | tee "$logs/train_benchmark.log"
