#!/usr/bin/env bash
# Every GPU check of issue 11 in one call, for a lent GPU's short lease: the CUDA tests, the lever
# table at 720p (benchmarks/bench.py), the CLI end to end on a 720p video, compiled rows, and a few
# training steps. Each step has its own time limit and logs under $OUT as it goes, so a cut-off
# run still returns what it finished.
#
#   CVAE_FIXTURES=/path/to/fixtures OUT=results-cuda bash benchmarks/cuda.sh [budget seconds]
#   DEVICE=cpu SIZE=64x64 WIDTH=32 bash benchmarks/cuda.sh 300    # a smoke run of the script itself
#
# Needs PyAV for the CLI steps.
set -u
export OUT=${OUT:-benchmarks/results-cuda} DEVICE=${DEVICE:-cuda} SIZE=${SIZE:-1280x720} WIDTH=${WIDTH:-128}
BUDGET=${1:-480}
mkdir -p "$OUT"
export LOG="$OUT/cuda.log" PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1 TIMEFORMAT="%R s"

step() {  # step NAME SECONDS COMMAND...: run with a limit (never past the budget), log, go on
    local name=$1 limit=$2 t0=$SECONDS
    shift 2
    local left=$((BUDGET - SECONDS))
    ((limit > left)) && limit=$left
    ((limit < 10)) && { echo "== $name: skipped, out of time" >>"$LOG"; return; }
    echo "== $name (limit ${limit}s)" >>"$LOG"
    timeout "$limit" "$@" >>"$LOG" 2>&1
    echo "== $name: rc=$? in $((SECONDS - t0))s" >>"$LOG"
}

cli_720p() {  # the CLI as a user runs it: a released-layout model (random weights), a 97-frame H.264 video
    python3 - <<'EOF' || return
import os, sys, torch
sys.path.insert(0, "benchmarks")
from bench import frames_of
from cvae_cli.checkpoints import save_model
from cvae_cli.media import VideoWriter
from cvae_cli.model import CausalVAE, CausalVAEConfig
w, h = map(int, os.environ["SIZE"].split("x"))
torch.manual_seed(0)
save_model(CausalVAE(CausalVAEConfig(hidden_size=int(os.environ["WIDTH"]))).half(), "/tmp/cvae-bench.safetensors")
with VideoWriter("/tmp/cvae-bench.mp4", 30, w, h) as out:
    for f in frames_of(97, w, h):
        out.write(f)
EOF
    for args in "" "--tile off" "--fast"; do
        rm -f /tmp/cvae-bench-z.safetensors /tmp/cvae-bench-out.mp4
        echo "-- 97 frames $SIZE, options: ${args:-none}"
        time python3 -m cvae_cli encode /tmp/cvae-bench.mp4 -o /tmp/cvae-bench-z.safetensors \
            -w /tmp/cvae-bench.safetensors --device "$DEVICE" -q $args
        time python3 -m cvae_cli decode /tmp/cvae-bench-z.safetensors -o /tmp/cvae-bench-out.mp4 \
            -w /tmp/cvae-bench.safetensors --device "$DEVICE" -q $args
    done
}

train() {  # a few steps of the released-size model, then a resume to more steps
    rm -rf /tmp/cvae-bench-run
    for steps in 6 8; do
        python3 -m cvae_cli train --config v1.0.0 --data examples/ --frames 9 --size 128 --steps $steps \
            --save-every 3 --log-every 1 -b 2 --device "$DEVICE" --out /tmp/cvae-bench-run -q || return
    done
    cat /tmp/cvae-bench-run/loss.csv
}
export -f cli_720p train

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, av; print('torch', torch.__version__, 'av', av.__version__)"; } >>"$LOG" 2>&1

# Quick steps first; compilation (minutes of warm-up on a 16-core host) last, with what time is left.
step tests 120 python3 -m pytest -q -s -p no:cacheprovider tests/test_model.py tests/test_accel.py tests/test_device.py \
    -k "cuda and not all_levers"
bench=(python3 benchmarks/bench.py --device "$DEVICE" --size "$SIZE" --width "$WIDTH" --repeat 3)
step bench-levers 150 "${bench[@]}" --frames 17 --out "$OUT/bench-levers.json" \
    --rows "plain,fold_start,phase_upsample,slices,levers (default),levers+channels_last,levers+fused_norm"
step bench-chunk4 60 "${bench[@]}" --frames 13 --chunk 4 --out "$OUT/bench-chunk4.json" \
    --rows "plain,levers (default),levers+fused_norm"
# Frame norm: the layout memory.py counts, where the slices run (one 720p frame at a time).
step bench-chunk4-frame 60 "${bench[@]}" --frames 13 --chunk 4 --norm frame --out "$OUT/bench-chunk4-frame.json" \
    --rows "plain,levers (default)"
step cli 100 bash -c cli_720p
step train 60 bash -c train
step tests-compile 200 python3 -m pytest -q -s -p no:cacheprovider tests/test_accel.py -k "cuda and all_levers"
step bench-compile 400 "${bench[@]}" --frames 17 --rows "plain,levers (default),levers+all" --out "$OUT/bench-compile.json"
echo "== done in ${SECONDS}s" >>"$LOG"
