#!/usr/bin/env bash
# The checks the issues leave to a lent GPU machine, for one call of the device tool (at most 10 minutes; these
# bounds add up to 8.5 with the set-up), most needed first, each bounded so that one that hangs leaves the rest
# their time. What comes back (at most 8 files): $OUT/<benchmark>.json for each, $OUT/world_train.txt (its
# progress), $OUT/log.txt (the GPU, each step's exit status and messages) and $OUT/faces_unet_w64.safetensors, the
# faces world's wider model trained on from the committed one for TRAIN_SECONDS (default 90; world/MODEL_CARD.md).
# Here, once: bash scripts/device_kit.sh; then
#   run(command="bash scripts/device_run.sh bash scripts/device_checks.sh", carry=[".device"], timeout_s=600)
set -uo pipefail
cd "$(dirname "$0")/.."
device="${CHECK_DEVICE:-cuda}"  # cpu only to rehearse the script here
train_seconds="${TRAIN_SECONDS:-90}"
out="${OUT:-out/device}"
mkdir -p "$out"
log="$out/log.txt"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >> "$log" 2>&1 || echo "no GPU" >> "$log"

step() {  # file, seconds, command...: its output into $OUT/<file>, its messages into the log
    local file=$1 seconds=$2 started=$SECONDS
    shift 2
    echo "== $file (at most ${seconds} s)" >> "$log"
    timeout "$seconds" "$@" > "$out/$file" 2>> "$log"
    echo "$file: exit $? after $((SECONDS - started)) s" | tee -a "$log"
}

step bench_discovery.json 90 python3 -m benchmarks.bench_discovery --json --device "$device"
# --seconds counts from the first step: drawing the 20,000 faces, loading and exporting come on top
step world_train.txt $((train_seconds + 60)) python3 -m world.train --init world/faces_unet_w64.safetensors --width 64 \
    --lr 1e-4 --bf16 --steps 1000000 --seconds "$train_seconds" --checkpoint /tmp/world-train-w64/checkpoint.safetensors \
    --export "$out/faces_unet_w64.safetensors"
step bench_invert.json 90 python3 -m benchmarks.bench_invert --json --device "$device"
step bench_apply.json 45 python3 -m benchmarks.bench_apply --json --device "$device"
step bench_directions.json 120 python3 -m benchmarks.bench_directions --json --device "$device"
