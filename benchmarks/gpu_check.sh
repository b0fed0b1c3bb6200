#!/usr/bin/env bash
# The checks that need a GPU, in one go: the CUDA tests, then whole sweeps under the basic and packed
# launchers (bench_sweep.py). Each part's output goes to OUT_DIR as well as to the terminal; a failing
# part does not stop the others. On a machine without mlpsweep's dependencies, source
# benchmarks/gpu_env.sh first. The parts' time limits add up to 570 s: one call of a lent machine's
# 600 s runs them all.
#
#   MNIST_ROOT=../shared/data benchmarks/gpu_check.sh [OUT_DIR]
set -u
out=${1:-gpu-check}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
python=${PYTHON:-python3}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 | tee "$out/gpu.txt"
"$python" -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())" 2>&1 | tee -a "$out/gpu.txt"
timeout 150 "$python" -m pytest -q -rs -p no:cacheprovider -o addopts="" \
    tests/test_packed.py tests/test_steps.py tests/test_resume.py -k "cuda or gpu" 2>&1 | tee "$out/tests.txt"
timeout 150 "$python" benchmarks/bench_sweep.py --sweeps lecture --launchers packed --logs "$out" 2>&1 | tee "$out/bench_lecture.txt"
timeout 270 "$python" benchmarks/bench_sweep.py --sweeps a,c --launchers packed,basic --logs "$out" 2>&1 | tee "$out/bench_sweep.txt"
