#!/usr/bin/env bash
# The README's benchmark table, one row per run: bash bench_all.sh [LOG_DIR]
# Each row starts with an empty compile cache, so its start time is a cold start; the first row runs twice,
# the second time on the cache the first one left (the warm start).
set -u
logs=${1:-checkpoints/bench/logs}; mkdir -p "$logs"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
python -c "import bench; bench.bench_config([])" > /dev/null  # build the backbones and the data set once
row() {  # row NAME CACHE FLAGS...
  name=$1 cache=$2; shift 2
  echo "=== $name: python bench.py $*"
  TORCHINDUCTOR_CACHE_DIR=$cache python bench.py "$@" > "$logs/$name.log" 2>&1 || echo "failed: see $logs/$name.log"
  grep -E "^(BENCH|PROFILE|GENERATE)" "$logs/$name.log"
}
fresh() { rm -rf "$logs/cache_$1"; echo "$logs/cache_$1"; }
row projector "$(fresh projector)" --max_steps 300 --profile_at 100
row projector_warm "$logs/cache_projector" --max_steps 30
row eager "$(fresh eager)" --compile false --max_steps 60
row tokens196 "$(fresh tokens196)" --pixel_unshuffle 1 --max_steps 100
row lora "$(fresh lora)" --phase lora --max_steps 100
row lora_vision "$(fresh lora_vision)" --phase lora --lora_vision true --max_steps 100
row batch256 "$(fresh batch256)" --batch_size 256 --max_steps 60
