#!/usr/bin/env bash
# Every GPU check of issues 11 and 20 in one call, for a lent GPU's short lease: the CUDA tests,
# `cvae bench --compare` at 720p (the plain path, the default levers, --fast, --compile), the compile
# warm-up per block against the whole step, and, where PyAV is installed, the CLI end to end on a
# 720p video and a few training steps. Each step has its own time limit and logs under $OUT as it
# goes, so a cut-off run still returns what it finished. Run from the source tree (no install).
#
#   CVAE_FIXTURES=/path/to/fixtures OUT=results-cuda bash benchmarks/cuda.sh [budget seconds]
#   DEVICE=cpu SIZE=64x64 WIDTH=32 bash benchmarks/cuda.sh 300    # a smoke run of the script itself
set -u
export OUT=${OUT:-benchmarks/results-cuda} DEVICE=${DEVICE:-cuda} SIZE=${SIZE:-1280x720} WIDTH=${WIDTH:-128}
BUDGET=${1:-540}
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
from cvae_cli.bench import frames_of
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
  python3 -c "import torch; print('torch', torch.__version__)"
  python3 -c "import av; print('av', av.__version__)"; } >>"$LOG" 2>&1
have_av() { python3 -c "import av" 2>/dev/null; }

# Quick steps first; compilation (minutes of warm-up on a 16-core host) last, with what time is left.
step tests 90 python3 -m pytest -q -s -p no:cacheprovider tests/test_model.py tests/test_accel.py tests/test_device.py \
    -k "cuda and not all_levers"
step bench-compare 200 python3 -m cvae_cli bench --config v1.0.0 --size "$SIZE" --frames 17 --compare \
    --device "$DEVICE" --json "$OUT/bench-compare.json"
# Warm-up of --compile: per block (now) against the whole step (before), each in a fresh process.
compile=(python3 benchmarks/compile.py --device "$DEVICE" --dtype bfloat16 --size "$SIZE" --width "$WIDTH" --frames 33 --chunk 8 --repeat 2)
step compile-blocks 150 "${compile[@]}" --variant blocks,eager --out "$OUT/compile-blocks.json"
have_av && step cli 100 bash -c cli_720p
step compile-whole 240 "${compile[@]}" --variant whole,eager --out "$OUT/compile-whole.json"
have_av && step train 60 bash -c train
echo "== done in ${SECONDS}s" >>"$LOG"
