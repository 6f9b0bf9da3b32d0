#!/usr/bin/env bash
# The GPU device check in one command: bash benchmarks/device_check.sh [OUT] [OPTIONS]  (OUT default: $OUT)
#
# On the GPU machine (python3 with torch, no MONAI or nibabel, no network) it first installs the
# wheels that `python -m benchmarks.gather_wheels` put into .device-check/wheels, into a folder
# under /tmp (nothing system-wide), then runs every step of benchmarks/device_check.py on CUDA
# against the MNI152 template in .device-check/. Extra arguments go to device_check.py
# (e.g. --device cpu --quick for the dry run).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-device-check-out}"
if [ $# -gt 0 ] && [ "${1#-}" = "$1" ]; then  # a first argument that is not an option names the folder
    out="$1"
    shift
fi
mkdir -p "$out"
python="${PYTHON:-python3}"
bundle=.device-check
if compgen -G "$bundle/wheels/*.whl" > /dev/null; then
    site="$(mktemp -d /tmp/med3d-site.XXXXXX)"
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" "$bundle"/wheels/*.whl \
        || { echo "installing the wheels of $bundle/wheels failed" | tee "$out/device_check.log"; exit 2; }
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
scan=()
if [ -f "$bundle/mni152_t1.nii.gz" ]; then
    scan=(--scan "$bundle/mni152_t1.nii.gz")
fi
export PYTHONUNBUFFERED=1
exec "$python" -m benchmarks.device_check --device cuda --out "$out" "${scan[@]}" "$@"
