#!/usr/bin/env bash
# The system packages the tests use: Debian's invesalius-examples (the head CT of `med3d demo` and
# of the transfer evidence). CI runs as root, so apt-get installs what is missing; elsewhere it says
# what to run. Under CI=true the tests that need it fail without it (tests/skips.py, `needs`).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
cranium=$("$PY" -c 'from med3d_hub.inference.demo import CRANIUM_INV3; print(CRANIUM_INV3)')
if [ -f "$cranium" ]; then
    echo "=== system packages: $cranium is installed"
elif [ "$(id -u)" = 0 ]; then
    echo "=== system packages: installing invesalius-examples for $cranium"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends invesalius-examples > /dev/null
    [ -f "$cranium" ] || { echo "invesalius-examples is installed but $cranium is not there" >&2; exit 1; }
else
    echo "=== system packages: $cranium is missing; install it with: sudo apt-get install invesalius-examples" >&2
fi
