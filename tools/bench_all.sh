#!/usr/bin/env bash
# The README's benchmark tables: bash tools/bench_all.sh [ROW...]   (logs in checkpoints/bench/logs; default: every row)
# Each row starts with an empty compile cache, so its start time is a cold start; projector_warm reruns the
# projector row on the cache it left (the warm start). startup times the first step at CC3M's size (595,375 records)
# with nothing kept; startup_warm starts it again on the compile cache and the records' lengths that it left. The
# generate rows time captioning alone (after 12 steps).
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
fresh() { rm -rf "$logs/cache_$1"; echo "$logs/cache_$1"; }
bigp=(--batch_tokens 4096 --max_steps 20 --log_every 5 --compile false --generate false)  # eager: no compile wait
big=(--phase lora "${bigp[@]}")
gen=(--max_steps 12 --compile false)  # a few eager steps (generation runs eager in any case)
for row in $rows; do
  case $row in
    projector)      run "$row" "$(fresh projector)" --max_steps 300 --profile_at 100 --generate false ;;
    projector_warm) run "$row" "$logs/cache_projector" --max_steps 30 --generate false ;;
    startup)        run "$row" "$(fresh "$row")" --records 595375 --cache_dir "$(fresh lengths)" --max_steps 20 --generate false ;;  # CC3M's size
    startup_warm)   run "$row" "$logs/cache_startup" --records 595375 --cache_dir "$logs/cache_lengths" --max_steps 20 --generate false ;;  # lengths kept
    dirty)          run "$row" "$(fresh "$row")" --data dirty --max_bad_fraction 0.2 --max_steps 300 --generate false ;;
    instruct)       run "$row" "$(fresh "$row")" --data instruct --max_text_tokens 1024 --max_steps 200 --generate false ;;
    accum2)         run "$row" "$(fresh "$row")" --batch_tokens 8192 --grad_accum 2 --max_steps 100 --generate false ;;  # 16384 in halves
    eager)          run "$row" "$(fresh "$row")" --compile false --max_steps 60 --generate false ;;
    eager_ckpt)     run "$row" "$(fresh "$row")" --compile false --max_steps 60 --generate false --gradient_checkpointing true ;;
    tokens196)      run "$row" "$(fresh "$row")" --pixel_unshuffle 1 --max_steps 100 --generate false ;;
    lora)           run "$row" "$(fresh "$row")" --phase lora --max_steps 100 --generate false ;;
    lora_vision)    run "$row" "$(fresh "$row")" --phase lora --lora_vision true --max_steps 100 --generate false ;;
    full)           run "$row" "$(fresh "$row")" --phase full --max_steps 40 --generate false ;;  # the LM's every weight (cold compile: 2+ min)
    tokens32k)      run "$row" "$(fresh "$row")" --batch_tokens 32768 --batch_size 512 --max_steps 60 --generate false ;;
    phi2)           run "$row" "$(fresh "$row")" --size clip-l-336+phi-2 "${big[@]}" ;;
    phi2_ckpt)      run "$row" "$(fresh "$row")" --size clip-l-336+phi-2 "${big[@]}" --gradient_checkpointing true ;;
    phi3)           run "$row" "$(fresh "$row")" --size clip-l-336+phi-3-mini "${big[@]}" ;;
    phi3_ckpt)      run "$row" "$(fresh "$row")" --size clip-l-336+phi-3-mini "${big[@]}" --gradient_checkpointing true ;;
    phi3_full_ckpt) run "$row" "$(fresh "$row")" --size clip-l-336+phi-3-mini --phase full "${bigp[@]}" --gradient_checkpointing true ;;
    phi2_projector)      run "$row" "$(fresh "$row")" --size clip-l-336+phi-2 "${bigp[@]}" ;;  # phase 1: the LM frozen
    phi2_projector_ckpt) run "$row" "$(fresh "$row")" --size clip-l-336+phi-2 "${bigp[@]}" --gradient_checkpointing true ;;
    generate)             run "$row" "$(fresh "$row")" "${gen[@]}" ;;
    generate_tokens196)   run "$row" "$(fresh "$row")" "${gen[@]}" --pixel_unshuffle 1 ;;
    generate_lora)        run "$row" "$(fresh "$row")" "${gen[@]}" --phase lora ;;
    generate_lora_vision) run "$row" "$(fresh "$row")" "${gen[@]}" --phase lora --lora_vision true ;;
    *) echo "unknown row $row" ;;
  esac
done
