#!/usr/bin/env bash
# The GPU checks in one device call: the prep benchmark (issue 3's target: at most 0.6 s per 49x480x720 video with
# the full-size VAE on one H200), then the training benchmark (full-size 2b, against the H200 reference step time).
#
# Here, once:  bash benchmarks/fetch_device_wheels.sh     (diffusers, webdataset, PyAV, DeepSpeed wheels into .whl/)
# Then:        device run, command "bash benchmarks/device_h200.sh", carry [".whl"], timeout_s 600
#
# Budget: ~60 s install and imports + PREP_TIMEOUT (300) + TRAIN_TIMEOUT (180) stays under the tool's 600 s. Expected
# on an H200: prep ~10 s per eager VAE variant and 1-2 min per compiled one for 8 clips, then ~20 s of T5-XXL;
# training ~1.5 min (3.4 GB checkpoint written, 12 steps). Every report is rewritten as it goes and all output goes
# to files under $OUT unfiltered, so a part cut short or failing still returns what it measured and its traceback.
# PREP_ARGS / TRAIN_ARGS add flags (e.g. PREP_ARGS="--device cpu --clip 9x64x96 --t5-layers 1" for a CPU dry run).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench_out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || { echo "wheel install failed: run benchmarks/fetch_device_wheels.sh here and carry .whl" >&2; exit 1; }
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 PATH=/tmp/site/bin:$PATH
{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1
  python3 -c "import torch, diffusers, transformers, deepspeed; print('torch', torch.__version__, 'cuda',
    torch.version.cuda, 'cudnn', torch.backends.cudnn.version(), 'diffusers', diffusers.__version__,
    'transformers', transformers.__version__, 'deepspeed', deepspeed.__version__)" 2>&1
} >"$OUT/env.txt"
tail -n 1 "$OUT/env.txt"

echo "== prep benchmark (log: $OUT/prep_log.txt)"
timeout "${PREP_TIMEOUT:-300}" python3 benchmarks/bench_prep.py --full-size --count "${COUNT:-8}" \
  --decode-workers 4 --json "$OUT/prep_full_size.json" ${PREP_ARGS:-} >"$OUT/prep_log.txt" 2>&1
prep_rc=$?
grep --line-buffered "^\[bench\]" "$OUT/prep_log.txt" | cut -c1-300

echo "== train benchmark (log: $OUT/train_log.txt)"
timeout "${TRAIN_TIMEOUT:-180}" python3 benchmarks/bench_train.py --full-size --work /tmp/bench-train \
  --json "$OUT/train_full_size.json" ${TRAIN_ARGS:-} >"$OUT/train_log.txt" 2>&1
train_rc=$?
cp /tmp/bench-train/train_log.txt "$OUT/train_run_log.txt" 2>/dev/null
cp /tmp/bench-train/run/metrics.jsonl "$OUT/train_metrics.jsonl" 2>/dev/null

python3 - "$OUT" <<'PY'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
for name in ("prep_full_size.json", "train_full_size.json"):
    path = out / name
    if not path.is_file():
        print(f"{name}: missing"); continue
    r = json.loads(path.read_text())
    if "variants" in r:
        for variant, v in r["variants"].items():
            s = v.get("s_per_video", {})
            print(f"prep {variant:28s} vae {s.get('vae', '-')} pipelined {s.get('pipelined', '-')} "
                  f"peak {v.get('vae_peak_gib', '-')} GiB diff {v.get('mean_max_abs_diff', '-')} {v.get('error', '')}")
        print("prep t5", r.get("t5"), "decode", r.get("decode_pool_s_per_video"), "best", r.get("best"))
    else:
        print("train", {k: r.get(k) for k in ("returncode", "s_per_step_median", "peak_memory_gib",
                                              "tokens_per_s_median", "vs_reference", "error")})
PY
echo "exit codes: prep $prep_rc, train $train_rc"
[ "$prep_rc" -eq 0 ] && [ "$train_rc" -eq 0 ]
