#!/usr/bin/env bash
# Wheels the GPU machine lacks for the prep benchmark (its python3 is 3.12 with torch, transformers, safetensors,
# sentencepiece, pyyaml and tqdm, but no diffusers, webdataset or PyAV), downloaded into .whl/ (keep it out of git:
# echo /.whl/ >> .git/info/exclude). Then run benchmarks/device_prep_h200.sh there with .whl carried.
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .whl && mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform manylinux_2_34_x86_64 --platform any -d .whl \
  diffusers==0.42.1 webdataset==1.0.2 braceexpand==0.1.7 av==18.1.0
ls -1 .whl
du -sh .whl
