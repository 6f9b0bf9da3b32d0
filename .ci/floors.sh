#!/usr/bin/env bash
# Floors stage: the test suite on the oldest core dependencies pyproject.toml allows (.ci/floors.txt:
# torch, numpy, huggingface_hub, safetensors, requests, timm, filelock), together in their own
# virtual environment, .venv-floors. torch 2.1 is built for numpy 1.x, so it cannot be layered over
# the main environment the way .ci/compat.sh layers huggingface_hub. No extras are installed: the
# tests of the io, demo and train extras skip themselves (pytest.importorskip); the core runs.
#
#   bash .ci/floors.sh prepare   # the environment (a few minutes of downloading; .ci/run starts it early)
#   bash .ci/floors.sh test      # then the tests not marked slow; more arguments go to pytest
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv-floors
case "${1:-}" in
    prepare)
        rm -rf "$VENV"
        python3 -m venv "$VENV"
        "$VENV/bin/pip" install --quiet --disable-pip-version-check -r .ci/floors.txt "pytest>=7.4" "pytest-timeout>=2.1"
        "$VENV/bin/python" -c 'import huggingface_hub, numpy, requests, safetensors, timm, torch; print("=== floors: prepared torch", torch.__version__, "numpy", numpy.__version__, "huggingface_hub", huggingface_hub.__version__, "safetensors", safetensors.__version__, "requests", requests.__version__, "timm", timm.__version__)'
        ;;
    test)
        shift
        # The source tree on the path, as in the main run; one thread per process, as in .ci/compat.sh.
        PYTHONPATH="$PWD" OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 "$VENV/bin/python" -m pytest -q -p no:cacheprovider "$@"
        ;;
    *)
        echo "usage: bash .ci/floors.sh prepare|test [pytest arguments]" >&2
        exit 2
        ;;
esac
