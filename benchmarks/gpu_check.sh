#!/usr/bin/env bash
# The checks that need a GPU, in one go: the CUDA tests, then bench_engine.py on the GPU in both
# modes. Each part's output goes to OUT_DIR as well as to the terminal; a failing part does not
# stop the others.
#
#   MNIST_ROOT=../shared/data benchmarks/gpu_check.sh [OUT_DIR]
set -u
out=${1:-gpu-check}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
python=${PYTHON:-python}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 | tee "$out/gpu.txt"
"$python" -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())" 2>&1 | tee -a "$out/gpu.txt"
timeout 240 "$python" -m pytest -q -rs -p no:cacheprovider tests/test_steps.py tests/test_resume.py -k "cuda or gpu" 2>&1 | tee "$out/tests.txt"
timeout 300 "$python" benchmarks/bench_engine.py --device cuda --epochs 3 2>&1 | tee "$out/bench_epoch.txt"
timeout 300 "$python" benchmarks/bench_engine.py --device cuda --mode sweep --epochs 2 2>&1 | tee "$out/bench_sweep.txt"
