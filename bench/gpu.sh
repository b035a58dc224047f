#!/usr/bin/env bash
# The GPU checks, on a machine with CUDA: `bash bench/gpu.sh [out-dir]`.
# 1. the gpu-marked core tests (cached-vs-full logits and bf16 on CUDA, CUDA RNG in checkpoints, NCCL DDP
#    with 2+ GPUs), 2. the GPU bench at DALL-E's shape and the 256 px loader, 3. the gpu-marked flow tests
#    (the tiny pipeline with every stage on CUDA, configs/dalle-256.yaml at its own shape on CUDA).
set -uo pipefail
out=${1:-bench/results/gpu}
PY=${PYTHON:-python3}
mkdir -p "$out"
export PREFECT_SERVER_ANALYTICS_ENABLED=false PREFECT_HOME=$(mktemp -d) PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$out/gpu.txt"
timeout 150 $PY -m pytest -m gpu tests/core -v -rs -p no:cacheprovider 2>&1 | tee "$out/gpu_core_tests.log"
timeout 200 $PY -m bench.run --device cuda --repeats 3 --only dalle_ loader_256 2>&1 | tee "$out/gpu_bench.log"
cp bench/results/*.json "$out/" 2>/dev/null
timeout 300 $PY -m pytest -m gpu tests/flows -v -rs -p no:cacheprovider 2>&1 | tee "$out/gpu_flow_tests.log"
