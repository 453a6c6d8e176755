#!/usr/bin/env bash
# The device-machine check for issue 22 (one run, about 6 minutes): install the project as gpu_check.sh does, then
#   1. benchmarks/backbone_speed.py at its GPU defaults (224 px, batch 64, bf16; ViT-S/14 and ViT-B/14 with LoRA
#      r=8, ConvNeXt-T, ResNet-50, EfficientNet-B0): slices/s and peak memory, the platform's classifier against
#      the same network in a plain loop (goal >= 0.95x);
#   2. the Ray Train + Lightning path against its plain loop for ViT-S/14 with LoRA (train_throughput.py);
#   3. the GPU tests of the timm/LoRA models.
#   run(command="bash benchmarks/gpu_backbones.sh", carry=[".whl"], timeout_s=420)
set -uo pipefail
export PYTHONUNBUFFERED=1 RAY_USAGE_STATS_ENABLED=0
mkdir -p /tmp/site && tar -C /tmp/site -xJf .whl/site312.tar.xz && export PYTHONPATH=/tmp/site || exit 1
python3 -m pip install -q --no-deps --no-index --no-build-isolation -e . >/dev/null 2>&1 || { echo "install failed"; exit 1; }
python3 -c "import timm, peft; print('timm', timm.__version__, 'peft', peft.__version__)" || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
timeout 200 python3 benchmarks/backbone_speed.py --json "$OUT" 2>&1 | grep -v -i warn | tail -12 \
    | tee "$OUT/backbone_speed.txt"
timeout 150 python3 benchmarks/train_throughput.py --model vit_small_patch14_dinov2 --lora-rank 8 --out "$OUT" \
    2>&1 | grep -v "^\s*$" | tail -12 | tee "$OUT/train_throughput_vit.txt"
timeout 60 python3 -m pytest -q -m gpu tests/test_timm_lora.py -p no:cacheprovider 2>&1 | tail -5
echo "all done after ${SECONDS}s"
