#!/usr/bin/env bash
# The GPU checks in one device call: the prep benchmark (issue 3's target: at most 0.6 s per 49x480x720 video with
# the full-size VAE on one H200), then the training benchmark (full-size 2b, against the H200 reference step time).
#
# Here, once:  bash benchmarks/fetch_device_wheels.sh     (diffusers, webdataset, PyAV, DeepSpeed wheels into .whl/)
# Then:        device run, command "bash benchmarks/device_h200.sh", carry [".whl"], timeout_s 560
#
# Expected on an H200: ~40 s install; prep ~20 s for T5-XXL, ~10 s per eager VAE variant and 1-2 min per compiled
# one (8 clips); training ~1.5 min (3.4 GB checkpoint written, 12 steps). Each report is rewritten as it goes, so a
# run cut short still returns what it measured. PREP_TIMEOUT / TRAIN_TIMEOUT bound the two parts; PREP_ARGS and
# TRAIN_ARGS add flags (e.g. PREP_ARGS="--device cpu --clip 9x64x96 --t5-layers 1" for a dry run without a GPU).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench_out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || { echo "wheel install failed: run benchmarks/fetch_device_wheels.sh here and carry .whl" >&2; exit 1; }
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 PATH=/tmp/site/bin:$PATH
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv >"$OUT/gpu.csv" 2>&1
python3 -c "import torch, diffusers, transformers, deepspeed; print('torch', torch.__version__, 'cuda',
  torch.version.cuda, 'cudnn', torch.backends.cudnn.version(), 'diffusers', diffusers.__version__,
  'transformers', transformers.__version__, 'deepspeed', deepspeed.__version__)" 2>&1 | tail -1 | tee "$OUT/versions.txt"

echo "== prep benchmark" >&2
timeout "${PREP_TIMEOUT:-330}" python3 benchmarks/bench_prep.py --full-size --count "${COUNT:-8}" --decode-workers 4 \
  --json "$OUT/prep_full_size.json" ${PREP_ARGS:-} 2>&1 | grep -v "^  " | tee "$OUT/prep_log.txt"
echo "== train benchmark" >&2
timeout "${TRAIN_TIMEOUT:-200}" python3 benchmarks/bench_train.py --full-size --work /tmp/bench-train \
  --json "$OUT/train_full_size.json" ${TRAIN_ARGS:-} 2>&1 | grep -v "^  " | tee "$OUT/train_log.txt"
cp /tmp/bench-train/train_log.txt "$OUT/train_run_log.txt" 2>/dev/null
ls -l "$OUT"
