#!/usr/bin/env bash
# The device-machine check (one run): unpack the offline site archive, install the project, then
#   1. the training throughput benchmark, alone on the GPU (its figures are timings), with a torch.profiler
#      summary of each path's warm-up steps under $OUT/profiles (GPU busy share, DataLoader waits, top operators);
#   2. the attention-MIL benchmark from random init, its claim from a pretrained encoder (pytest -m benchmark)
#      and the GPU tests, side by side: only accuracy and attention are read from those, so they may share the GPU.
# Every phase has a time limit inside DEADLINE_S (from the script's start), so one call with a timeout a little
# above it brings back whatever finished; figures land in $OUT. Prepared so one call does it all:
#   run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=600)
set -uo pipefail
export PYTHONUNBUFFERED=1 RAY_USAGE_STATS_ENABLED=0
DEADLINE_S=${DEADLINE_S:-560}
left() { local s=$((DEADLINE_S - SECONDS)); echo $((s > 1 ? s : 1)); }
mkdir -p /tmp/site && tar -C /tmp/site -xJf .whl/site312.tar.xz && export PYTHONPATH=/tmp/site || exit 1
python3 -m pip install -q --no-deps --no-index --no-build-isolation -e . >/dev/null 2>&1 || { echo "install failed"; exit 1; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
echo "ready after ${SECONDS}s"

timeout 240 python3 benchmarks/train_throughput.py --epochs "${THROUGHPUT_EPOCHS:-3}" --out "$OUT" \
    --profile "$OUT/profiles" 2>&1 | grep -v "^\s*$" | tail -25 \
    | tee "$OUT/train_throughput.txt"
echo "throughput done after ${SECONDS}s; $(left)s left"

MIL_ARGS=(--volumes "${MIL_VOLUMES:-640}" --epochs "${MIL_EPOCHS:-16}" --model efficientnet_b0 --image-size 64
          --num-slices 16 --batch-size 128 --oracle --out "$OUT")
timeout "$(left)" python3 benchmarks/mil_vs_slice.py "${MIL_ARGS[@]}" --seed 0 >"$OUT/mil_seed0.log" 2>&1 &
# attention-MIL against slice-level training from a pretrained encoder (BENCHMARKS.md's claim), on the GPU
timeout "$(left)" python3 -m pytest -q -m benchmark tests/test_mil.py -p no:cacheprovider >"$OUT/pytest_benchmark.txt" 2>&1 &
timeout "$(( $(left) < 200 ? $(left) : 200 ))" python3 -m pytest -q -m gpu tests/test_gpu.py tests/test_model.py \
    tests/test_augment.py -p no:cacheprovider 2>&1 | tail -15 | tee "$OUT/pytest_gpu.txt"
wait
grep -v -i "warn" "$OUT/mil_seed0.log" | tail -9
tail -5 "$OUT/pytest_benchmark.txt"
echo "all done after ${SECONDS}s"
