#!/usr/bin/env bash
# The README's benchmark tables: bash tools/bench_all.sh [ROW...]   (logs in checkpoints/bench/logs; default: every row)
# Each row starts with an empty compile cache, so its start time is a cold start; projector_warm reruns the
# projector row on the cache it left (the warm start). startup times the first step at CC3M's size (595,375 records)
# with nothing kept; startup_warm starts it again on the compile cache and the records' lengths that it left. The
# generate rows time captioning (tools/bench_generate.py).
set -u
logs=$PWD/checkpoints/bench/logs; mkdir -p "$logs"  # absolute: Inductor runs its C++ compiler from elsewhere
rows=${*:-projector projector_warm startup startup_warm dirty instruct accum2 eager eager_ckpt tokens196 lora lora_vision full tokens32k phi2 phi2_ckpt phi3 phi3_ckpt phi3_full_ckpt
  phi2_projector phi2_projector_ckpt
  generate generate_tokens196 generate_lora generate_lora_vision}
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
run() {  # run NAME CACHE FLAGS...
  name=$1 cache=$2; shift 2
  echo "=== $name: python -m tools.bench $*"
  TORCHINDUCTOR_CACHE_DIR=$cache python -m tools.bench "$@" > "$logs/$name.log" 2>&1 || echo "failed: see $logs/$name.log"
  grep -oE "(BENCH|PROFILE|GENERATE) .*" "$logs/$name.log"  # (a progress bar may lead the line)
}
captions() {  # captions NAME FLAGS...: tools.bench_generate (batch 256, 32 new tokens)
  name=$1; shift
  echo "=== $name: python -m tools.bench_generate $*"
  python -m tools.bench_generate "$@" > "$logs/$name.log" 2>&1 || echo "failed: see $logs/$name.log"
  grep -oE "GENERATE .*" "$logs/$name.log"
}
fresh() { rm -rf "$logs/cache_$1"; echo "$logs/cache_$1"; }
bigp=(--batch_tokens 4096 --max_steps 20 --log_every 5 --compile false)  # eager: no compile wait
big=(--phase lora "${bigp[@]}")
for row in $rows; do
  case $row in
    projector)      run "$row" "$(fresh projector)" --max_steps 300 --profile_at 100 ;;
    projector_warm) run "$row" "$logs/cache_projector" --max_steps 30 ;;
    startup)        run "$row" "$(fresh "$row")" --records 595375 --cache_dir "$(fresh lengths)" --max_steps 20 ;;  # CC3M's size
    startup_warm)   run "$row" "$logs/cache_startup" --records 595375 --cache_dir "$logs/cache_lengths" --max_steps 20 ;;  # lengths kept
    dirty)          run "$row" "$(fresh "$row")" --data dirty --max_bad_fraction 0.2 --max_steps 300 ;;
    instruct)       run "$row" "$(fresh "$row")" --data instruct --max_text_tokens 1024 --max_steps 200 ;;
    accum2)         run "$row" "$(fresh "$row")" --batch_tokens 8192 --grad_accum 2 --max_steps 100 ;;  # 16384 in halves
    eager)          run "$row" "$(fresh "$row")" --compile false --max_steps 60 ;;
    eager_ckpt)     run "$row" "$(fresh "$row")" --compile false --max_steps 60 --gradient_checkpointing true ;;
    tokens196)      run "$row" "$(fresh "$row")" --pixel_unshuffle 1 --max_steps 100 ;;
    lora)           run "$row" "$(fresh "$row")" --phase lora --max_steps 100 ;;
    lora_vision)    run "$row" "$(fresh "$row")" --phase lora --lora_vision true --max_steps 100 ;;
    full)           run "$row" "$(fresh "$row")" --phase full --max_steps 40 ;;  # the LM's every weight (cold compile: 2+ min)
    tokens32k)      run "$row" "$(fresh "$row")" --batch_tokens 32768 --batch_size 512 --max_steps 60 ;;
    phi2)           run "$row" "$(fresh "$row")" --size clip-l-336+phi-2 "${big[@]}" ;;
    phi2_ckpt)      run "$row" "$(fresh "$row")" --size clip-l-336+phi-2 "${big[@]}" --gradient_checkpointing true ;;
    phi3)           run "$row" "$(fresh "$row")" --size clip-l-336+phi-3-mini "${big[@]}" ;;
    phi3_ckpt)      run "$row" "$(fresh "$row")" --size clip-l-336+phi-3-mini "${big[@]}" --gradient_checkpointing true ;;
    phi3_full_ckpt) run "$row" "$(fresh "$row")" --size clip-l-336+phi-3-mini --phase full "${bigp[@]}" --gradient_checkpointing true ;;
    phi2_projector)      run "$row" "$(fresh "$row")" --size clip-l-336+phi-2 "${bigp[@]}" ;;  # phase 1: the LM frozen
    phi2_projector_ckpt) run "$row" "$(fresh "$row")" --size clip-l-336+phi-2 "${bigp[@]}" --gradient_checkpointing true ;;
    generate)             captions "$row" ;;  # and eval.py on 5,000 records
    generate_tokens196)   captions "$row" --pixel_unshuffle 1 --eval_records 0 ;;
    generate_lora)        captions "$row" --phase lora --eval_records 0 ;;
    generate_lora_vision) captions "$row" --phase lora --lora_vision true --eval_records 0 ;;
    *) echo "unknown row $row" ;;
  esac
done
