#!/usr/bin/env bash
# The prep benchmark's one GPU call (issue 3: at most 0.6 s per 49x480x720 video with the full-size VAE on one H200).
#
# Here, once:  bash benchmarks/fetch_device_wheels.sh          (diffusers, webdataset, PyAV wheels into .whl/)
# Then:        device run, command "bash benchmarks/device_prep_h200.sh", carry [".whl"], timeout_s 560
#
# Expected cost on an H200: ~30 s install, ~20 s T5-XXL build and timing, ~10 s per eager variant and ~1-2 min per
# compiled one for 8 clips; the report is rewritten after every stage, so a run cut short still returns numbers.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench_out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || { echo "wheel install failed: run benchmarks/fetch_device_wheels.sh here and carry .whl" >&2; exit 1; }
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv >"$OUT/gpu.csv" 2>&1
python3 -c "import torch, diffusers, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda,
  'cudnn', torch.backends.cudnn.version(), 'diffusers', diffusers.__version__, 'transformers', transformers.__version__)" \
  | tee "$OUT/versions.txt"
timeout "${BENCH_TIMEOUT:-480}" python3 benchmarks/bench_prep.py --full-size --count "${COUNT:-8}" \
  --decode-workers 4 --json "$OUT/prep_full_size.json" ${BENCH_ARGS:-} 2>&1 | grep -v "^  " | tee "$OUT/bench_log.txt"
echo "report: $OUT/prep_full_size.json"
