#!/usr/bin/env bash
# The shipped small model, from real package data, on a CPU (about 2 hours on 2 cores; minutes on a GPU).
#   recipes/small-model/train.sh [DATA_DIR] [RUNS_DIR]
# Every stage is resumable: run the script again after a kill and it goes on where it stopped.
# STAGES="1" runs stage 1 only, STAGES="2" stage 2 only (it needs stage 1's result).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
data=$(realpath "${1:-$here/data}")
runs=$(realpath -m "${2:-$here/runs}")
cvae=${CVAE:-cvae}
[[ -f $data/train-photos.txt ]] || python3 "$here/fetch_data.py" "$data"

# A few training-package files are held back to watch training (the evaluation packages never are).
mkdir -p "$runs"
for kind in photos clips; do
  awk 'NR % 12 != 0' "$data/train-$kind.txt" | sed "s|^|$data/|" > "$runs/fit-$kind.txt"
  awk 'NR % 12 == 0' "$data/train-$kind.txt" | sed "s|^|$data/|" > "$runs/watch-$kind.txt"
done
common=(--seed 0 --workers 2 --val "$runs/watch-photos.txt" --val "$runs/watch-clips.txt" --log-every 10)

stages=${STAGES:-1 2}

# Stage 1: an SD-architecture image VAE (all 2-D, 8x spatial, 4 latent channels) on photos and frames.
[[ $stages == *1* ]] && $cvae train --config "$here/image-vae.json" --out "$runs/stage1-image" \
  --data "$runs/fit-photos.txt" --data "$runs/fit-clips.txt" --frames 1 --size 64 --batch-size 16 \
  --steps "${STAGE1_STEPS:-7000}" --lr 1e-3 --warmup 200 --ema 0.999 --save-every 250 --val-every 500 "${common[@]}"

# Stage 2: inflate it (tail, and separately center) into the video layout and fine-tune on real clips
# plus camera paths over photos: identical data, seed and steps.
[[ $stages == *2* ]] || exit 0
for init in tail center; do
  $cvae train --inflate "$runs/stage1-image/final-sd-vae.safetensors" --init "$init" --arch "$here/video-vae.json" \
    --out "$runs/stage2-$init" --data "$runs/fit-clips.txt" --data "$runs/fit-photos.txt" \
    --frames 17 --size 48 --batch-size 4 --photo-motion 0.3 --image-ratio 0.1 \
    --steps "${STAGE2_STEPS:-800}" --lr 2e-4 --warmup 50 --ema 0.995 --save-every 100 --val-every 200 "${common[@]}"
done
$cvae plot "$runs/stage2-tail" "$runs/stage2-center" --label tail --label center --overwrite \
  -o "$runs/tail-vs-center.png" --title "stage 2: tail vs center initialization"
