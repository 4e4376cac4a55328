#!/usr/bin/env bash
# The checks the issues leave to a lent GPU machine, for one call of the device tool (at most 10 minutes; these
# bounds add up to about 8 with the set-up), most needed first, each bounded so that one that hangs leaves the rest
# their time. What comes back (at most 8 files):
# $OUT/benchmarks.jsonl (each benchmark's JSON, after its name), $OUT/log.txt (the GPU, each step's exit status and
# messages) and $OUT/faces_unet_w64.safetensors (the faces world's wider model trained on from the committed one
# for TRAIN_SECONDS, default 120; world/MODEL_CARD.md). Here, once: bash scripts/device_kit.sh; then
#   run(command="bash scripts/device_run.sh bash scripts/device_checks.sh", carry=[".device"], timeout_s=600)
set -uo pipefail
cd "$(dirname "$0")/.."
device="${CHECK_DEVICE:-cuda}"  # cpu only to rehearse the script here
out="${OUT:-out/device}"
mkdir -p "$out"
log="$out/log.txt"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >> "$log" 2>&1 || echo "no GPU" >> "$log"

step() {  # name, seconds, command...: its JSON line into benchmarks.jsonl, its messages into the log
    local name=$1 seconds=$2 started=$SECONDS
    shift 2
    echo "== $name (at most ${seconds} s)" >> "$log"
    printf '%s ' "$name" >> "$out/benchmarks.jsonl"
    timeout "$seconds" "$@" >> "$out/benchmarks.jsonl" 2>> "$log"
    local status=$?
    echo >> "$out/benchmarks.jsonl"
    echo "$name: exit $status after $((SECONDS - started)) s" | tee -a "$log"
}

step bench_discovery 90 python3 -m benchmarks.bench_discovery --json --device "$device"
echo "== world.train" >> "$log"
python3 -m world.train --init world/faces_unet_w64.safetensors --width 64 --lr 1e-4 --bf16 --steps 1000000 \
    --seconds "${TRAIN_SECONDS:-120}" --checkpoint /tmp/world-train-w64/checkpoint.safetensors \
    --export "$out/faces_unet_w64.safetensors" >> "$log" 2>&1
echo "world.train: exit $?" | tee -a "$log"
step bench_invert 90 python3 -m benchmarks.bench_invert --json --device "$device"
step bench_apply 45 python3 -m benchmarks.bench_apply --json --device "$device"
step bench_directions 150 python3 -m benchmarks.bench_directions --json --device "$device"
