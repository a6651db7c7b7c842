#!/usr/bin/env bash
# The GPU check, in one command from the project's folder: bash tools/gpu_check.sh
#   1. the tests with CUDA visible (the CUDA-only tests run instead of being skipped);
#   2. bench.py on CUDA at 10, 100 and 1000 classes, in fp32 and bf16, with peak memory;
#   3. the main job once per precision, each into its own run directory under output/gpu_check/.
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: this check is for a GPU')"
python -m pytest -q
for precision in fp32 bf16; do
    python bench.py --device cuda --classes 10 100 1000 --precision "$precision"
done
for precision in fp32 bf16 amp fp16; do
    python train.py --method mpl --shots 16 --device cuda --precision "$precision" \
        --output "output/gpu_check/$precision" --overwrite
done
