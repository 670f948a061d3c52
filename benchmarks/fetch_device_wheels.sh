#!/usr/bin/env bash
# Wheels a GPU machine without network access lacks for the benchmarks, into .whl/ (keep it out of git:
# echo /.whl/ >> .git/info/exclude). Written for a python3 3.12 that has torch, transformers, peft, safetensors,
# sentencepiece, pyyaml, tqdm, ninja and psutil but no diffusers, webdataset, PyAV or DeepSpeed. Copy the repository
# with .whl/ to that machine and run benchmarks/device_h200.sh there: it installs them first.
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .whl && mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform manylinux_2_34_x86_64 --platform any -d .whl \
  diffusers==0.42.1 webdataset==1.0.2 braceexpand==0.1.7 av==18.1.0 \
  hjson==3.1.0 pydantic==2.14.4 pydantic_core==2.50.5 annotated_types==0.8.0 typing_inspection==0.4.5
# DeepSpeed publishes only an sdist; built here without its ops it is a pure-Python wheel (ops JIT-build there).
DS_BUILD_OPS=0 python3 -m pip wheel -q --no-deps --no-build-isolation -w .whl deepspeed==0.19.8 2>/dev/null \
  || DS_BUILD_OPS=0 python3 -m pip wheel -q --no-deps -w .whl deepspeed==0.19.8
ls -1 .whl
du -sh .whl
