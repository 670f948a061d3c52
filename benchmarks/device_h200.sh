#!/usr/bin/env bash
# The GPU checks in one run, most important first, each with its own time limit inside one budget so that a
# slow case cannot starve the rest:
#   1. training, full-size (49x480x720, LoRA r=128, 1 rank, ZeRO-2): 2b baseline (flash attention, loader in the
#      training process, every block checkpointed, eager), 2b and 5b with everything on, then each switch alone on
#      2b (loader worker, cuDNN attention, compiled blocks, gradient_checkpointing auto), then the 5b baseline;
#   2. prep with the time left: T5-XXL first, the eager VAE variants, compiled variants last.
# Targets (docs/BENCHMARKS.md): 2b <= 0.75 s/step where memory allows and <= 1.0 s/step within 24 GiB,
# 5b <= 2.0 s/step, VAE <= 0.6 s/clip with T5. The summary (and each case's JSON) is rewritten after every case.
#
# Offline GPU: first, where there is network access, bash benchmarks/fetch_device_wheels.sh (diffusers, webdataset,
#              PyAV and DeepSpeed wheels into .whl/), and copy the repository with .whl/ to the GPU machine.
# Run:         bash benchmarks/device_h200.sh     (installs .whl/*.whl when present; OUT=bench_out, BUDGET_S=540)
#              PART=train or PART=prep runs one half: when one run cannot fit both, train in a first run and prep
#              in a second gets both; the default runs train, then prep in whatever the budget leaves.
# CPU dry run: FULL= BUDGET_S=400 OUT=/tmp/dry PREP_ARGS="--device cpu --clip 9x64x96 --t5-layers 1 --count 2" \
#              bash benchmarks/device_h200.sh     (tiny models; checks the script, not the speed)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench_out}
BUDGET_S=${BUDGET_S:-540}
FULL=${FULL---full-size}
PART=${PART:-all}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheel install failed: run benchmarks/fetch_device_wheels.sh here and carry .whl" >&2; exit 1; }
  export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH
fi
export PYTHONUNBUFFERED=1
{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn',
    torch.backends.cudnn.version())" 2>&1
  python3 -c "from importlib.metadata import version as v
print(*(f'{p} {v(p)}' for p in ('diffusers', 'transformers', 'peft', 'deepspeed', 'av', 'webdataset')))" 2>&1
} >"$OUT/env.txt"
tail -n 2 "$OUT/env.txt"

left() { echo $((BUDGET_S - SECONDS)); }

summary() {
  python3 - "$OUT" <<'PY'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
lines = []
for path in sorted(out.glob("train_*.json")):
    r = json.loads(path.read_text())
    lines.append(f"train {r.get('family', '?'):16s} {r.get('case', '?'):12s} s/step {r.get('s_per_step_median', '-')} "
                 f"peak {r.get('peak_memory_gib', '-')} GiB tokens/s {r.get('tokens_per_s_median', '-')} "
                 f"TFLOP/s {r.get('tflops_per_gpu_median', '-')} mfu {r.get('mfu_median', '-')} "
                 f"attention {r.get('attention', '-')} rc {r.get('returncode')} {r.get('error', '')}")
prep = out / "prep_full_size.json"
if prep.is_file():
    r = json.loads(prep.read_text())
    lines.append(f"prep t5 {r.get('t5')} decode {r.get('decode_pool_s_per_video')}")
    for variant, v in r.get("variants", {}).items():
        s = v.get("s_per_video", {})
        lines.append(f"prep {variant:28s} vae {s.get('vae', '-')} pipelined {s.get('pipelined', '-')} "
                     f"peak {v.get('vae_peak_gib', '-')} GiB diff {v.get('mean_max_abs_diff', '-')} {v.get('error', '')}")
    lines.append(f"prep best {r.get('best')}")
targets = {"CogVideoX-2b": 0.75, "CogVideoX-5b": 2.0}
for path in sorted(out.glob("train_*.json")):
    r = json.loads(path.read_text())
    if r.get("s_per_step_median") and r.get("family") in targets and r.get("mode") == "full-size-cuda":
        met = r["s_per_step_median"] <= targets[r["family"]]
        lines.append(f"target {r['family']} {r['case']}: {r['s_per_step_median']} s/step vs {targets[r['family']]} "
                     f"{'MET' if met else 'not met'}{' within 24 GiB' if r.get('peak_memory_gib', 99) <= 24 else ''}")
(out / "summary.txt").write_text("\n".join(lines) + "\n")
PY
}

# case FAMILY NAME LIMIT_S [--set key=value ...]
case_() {
  local family=$1 name=$2 limit=$3; shift 3
  local budget; budget=$(( $(left) - 10 ))
  (( budget < limit )) && limit=$budget
  if (( limit < 30 )); then echo "skip train $family $name: ${limit}s left"; return; fi
  echo "== train $family $name (limit ${limit}s)"
  timeout "$limit" python3 benchmarks/bench_train.py $FULL --family "$family" --work "/tmp/bench-train-$family" \
    --reuse-model --case "$name" --steps 10 --warmup 4 --json "$OUT/train_${family}_${name}.json" \
    --set model.attention_backend=flash --set data.num_workers=0 --set model.gradient_checkpointing=1 "$@" \
    >"$OUT/train_${family}_${name}.log" 2>&1
  cp "/tmp/bench-train-$family/run-$name.log" "$OUT/train_${family}_${name}_run.log" 2>/dev/null
  summary
  grep " $name " "$OUT/summary.txt" | grep "$family" | head -n 1
}

ALL=(--set model.attention_backend=auto --set data.num_workers=1 --set model.compile=blocks
     --set model.gradient_checkpointing=auto)
if [[ $PART != prep ]]; then
  case_ CogVideoX-2b baseline 90
  case_ CogVideoX-2b all 100 "${ALL[@]}"
  case_ CogVideoX-5b all 130 "${ALL[@]}"
  case_ CogVideoX-2b loader 40 --set data.num_workers=1
  case_ CogVideoX-2b cudnn 40 --set model.attention_backend=cudnn
  case_ CogVideoX-2b compile 90 --set model.compile=blocks
  case_ CogVideoX-2b ckpt_auto 40 --set model.gradient_checkpointing=auto
  case_ CogVideoX-5b baseline 90
  # Sequence parallelism needs two GPUs or more; its comparison point is the baseline above (one GPU, no SP).
  if (( $(nvidia-smi -L 2>/dev/null | wc -l) >= 2 )); then
    case_ CogVideoX-5b sp2 120 --nproc 2 --set parallel.sequence_parallel=2
  fi
fi
[[ $PART == train ]] && { summary; echo "== summary ($SECONDS s)"; cat "$OUT/summary.txt"; exit 0; }

limit=$(( $(left) - 5 ))
if (( limit >= 40 )); then
  echo "== prep benchmark (limit ${limit}s, log: $OUT/prep_log.txt)"
  timeout "$limit" python3 benchmarks/bench_prep.py $FULL --count "${COUNT:-6}" --decode-workers 4 \
    --json "$OUT/prep_full_size.json" ${PREP_ARGS:-} >"$OUT/prep_log.txt" 2>&1
  grep "^\[bench\]" "$OUT/prep_log.txt" | cut -c1-300
else
  echo "skip prep: ${limit}s left"
fi
summary
echo "== summary ($SECONDS s)"
cat "$OUT/summary.txt"
