#!/usr/bin/env bash
# Builds .device/ (git-ignored): what a lent GPU machine (the `device` tool) lacks to run the pinned host, the
# benchmarks and world.train, small enough to travel beside the working tree (64 MiB in all). That machine's
# image has Python 3.12 with torch and most of the host's requirements; it lacks the ones named below, which
# travel as wheels, and the host itself, which travels as a compressed copy of .cache/comfyui-<version>. The
# front end stays behind: a stand-in package gives the host an empty folder to serve.
#   bash scripts/device_kit.sh        then, through the device tool, with carry [".device"]:
#   bash scripts/device_run.sh python3 -m benchmarks.bench_discovery --json --device cuda
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON_VERSION="${DEVICE_PYTHON_VERSION:-3.12}"  # the device image's; another only to rehearse here
VPY=.venv/bin/python
rm -rf .device
mkdir -p .device/wheels .device/stubs/comfyui_frontend_package/static
if [ -n "${COMFYUI_PATH:-}" ]; then  # there harness/comfyui.py looks for the pinned host only
    echo "COMFYUI_PATH is set: unset it, so that the kit carries the pinned host" >&2
    exit 1
fi
host="$($VPY -m harness.comfyui)"
tar -C "$(dirname "$host")" -cJf ".device/$(basename "$host").tar.xz" --exclude=__pycache__ --exclude=tests \
    --exclude=tests-unit "$(basename "$host")"
# the host's requirements its start-up imports that the image lacks, at the versions the tests use here
for package in av torchsde trampoline; do
    $VPY -m pip download --quiet --no-deps --only-binary=:all: --python-version "$PYTHON_VERSION" \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d .device/wheels \
        "$package==$($VPY -c "from importlib.metadata import version; print(version('$package'))")"
done
cat > .device/stubs/comfyui_frontend_package/__init__.py <<'STUB'
"""Stand-in for the front end on a machine that only runs the in-process host: its folder to serve, empty."""
STUB
touch .device/stubs/comfyui_frontend_package/static/.keep
tree_bytes=$( (git ls-files -z; git ls-files -z --others --exclude-standard) | xargs -0 du -cb 2>/dev/null \
    | awk '$2 == "total" {sum += $1} END {print sum + 0}' || true)
kit_bytes=$(du -sb .device | cut -f1)
total_mib=$(( (tree_bytes + kit_bytes) / 1048576 ))
echo ".device: $(( kit_bytes / 1048576 )) MiB; with the working tree $total_mib MiB of the 64 MiB that may travel"
if [ "$total_mib" -ge 64 ]; then
    echo "too large to travel: leave something out" >&2
    exit 1
fi
