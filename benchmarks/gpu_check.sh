#!/usr/bin/env bash
# The device-machine check (one run): unpack the offline site archive, install the project, run the GPU tests
# and the training throughput benchmark; figures land in $OUT. Prepared so one call does it all:
#   run(command="bash benchmarks/gpu_check.sh", carry=[".whl"])
set -uo pipefail
export PYTHONUNBUFFERED=1 RAY_USAGE_STATS_ENABLED=0
mkdir -p /tmp/site && tar -C /tmp/site -xJf .whl/site312.tar.xz && export PYTHONPATH=/tmp/site || exit 1
python3 -m pip install -q --no-deps --no-index --no-build-isolation -e . >/dev/null 2>&1 || { echo "install failed"; exit 1; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
[ "${SKIP_GPU_TESTS:-0}" = 1 ] || timeout 150 python3 -m pytest -q -m gpu tests/test_gpu.py tests/test_model.py tests/test_augment.py -p no:cacheprovider 2>&1 | tail -15 | tee "$OUT/pytest_gpu.txt"
timeout 330 python3 benchmarks/train_throughput.py --out "$OUT" 2>&1 | grep -v "^\s*$" | tail -25 | tee "$OUT/train_throughput.txt"
