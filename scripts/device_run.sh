#!/usr/bin/env bash
# On a lent GPU machine, with .device/ carried (scripts/device_kit.sh): installs its wheels, unpacks the pinned
# host into .cache/ where harness/comfyui.py looks for it, then runs the command given, from the repository root.
#   bash scripts/device_run.sh python3 -m benchmarks.bench_invert --json --device cuda
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .device/wheels/*.whl
export PYTHONPATH="/tmp/site:$PWD/.device/stubs${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
mkdir -p .cache
for archive in .device/*.tar.xz; do  # the host's folder, named after it
    [ -d ".cache/$(basename "$archive" .tar.xz)" ] || tar -C .cache -xJf "$archive"
done
exec "$@"
