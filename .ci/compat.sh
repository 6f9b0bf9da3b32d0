#!/usr/bin/env bash
# Compatibility stage: the tests marked `hub` once per huggingface_hub generation.
#
# Each generation is layered over the main environment (no fresh torch): `pip install --target DIR
# --no-deps`, DIR first on PYTHONPATH. A generation's own transport comes along when the main
# environment lacks it (httpx for 1.x; 0.x uses requests, a declared dependency). httpx2, which only
# 2.x brings, is hidden from the older generations, as it is absent where users run them.
#   0.25.2  the declared floor (requests); 0.23 and 0.24 post a model card to the import-time endpoint
#   0.36.2  the last 0.x, what transformers<5 pins (requests)
#   1.33.0  the last 1.x (httpx)
#   2.x     the main environment's own (httpx2): the full suite ran against it in .ci/run
# Then the floors of numpy and timm, layered the same way, on the tests that exercise them.
#
# The layers' test runs wait mostly on servers and fresh processes, so MED3D_COMPAT_JOBS of them
# (default 2) run at once, each with one thread and its own temporary folder; their logs are printed
# in order afterwards, each headed by the versions it ran with.
# Override with MED3D_COMPAT_HUB_VERSIONS="0.30.2 1.0.0 ..." (MED3D_COMPAT_FLOORS=0 skips the floors);
# arguments go to pytest. With MED3D_CI_REPORTS set (.ci/run), each layer leaves its JUnit report there.
# The floors of torch, safetensors and requests need a numpy 1.x environment of their own: .ci/floors.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
VERSIONS=${MED3D_COMPAT_HUB_VERSIONS:-0.25.2 0.36.2 1.33.0}
JOBS=${MED3D_COMPAT_JOBS:-2}
LAYERS=$(mktemp -d)
trap 'rm -rf "$LAYERS"' EXIT
pip_target() { "$PY" -m pip install --quiet --disable-pip-version-check --target "$@"; }

NAMES=()      # one per test run, in the order the logs are printed
declare -A TESTS=()
echo "=== compatibility: huggingface_hub $("$PY" -c 'import huggingface_hub as h; print(h.__version__)') (main environment, full suite above)"
for version in $VERSIONS; do
    name="hf-$version"
    pip_target "$LAYERS/$name" --no-deps "huggingface_hub==$version"
    case "$version" in
        1.*) "$PY" -c "import httpx" 2>/dev/null || pip_target "$LAYERS/$name" "httpx>=0.23,<1" ;;
    esac
    case "$version" in
        2.*) ;;
        *) mkdir -p "$LAYERS/$name/httpx2"
           echo "raise ModuleNotFoundError('No module named httpx2 (hidden: huggingface_hub $version environments lack it)', name='httpx2')" \
               > "$LAYERS/$name/httpx2/__init__.py" ;;
    esac
    NAMES+=("$name"); TESTS[$name]="-m hub and not slow"
done

# Declared floors of numpy and timm, on the tests that lean on them. numpy 1.26 comes with a pandas
# built for numpy 1.x (as such environments have): the main environment's pandas needs numpy 2.
if [ "${MED3D_COMPAT_FLOORS:-1}" != 0 ]; then
    for spec in "numpy==1.26.4 pandas==2.2.3:tests/test_preprocess.py tests/test_io.py" \
                "timm==1.0.3:tests/test_timm_tools.py"; do
        requirements=${spec%%:*}
        first=${requirements%% *}
        name=${first/==/-}
        # shellcheck disable=SC2086
        pip_target "$LAYERS/$name" --no-deps $requirements
        NAMES+=("$name"); TESTS[$name]=${spec#*:}
    done
fi

describe() {  # the versions a layer runs with, for the log
    "$PY" - <<'PY' | paste -sd' '
import importlib.metadata, huggingface_hub, numpy
print("huggingface_hub", huggingface_hub.__version__, "from", huggingface_hub.__file__)
print("numpy", numpy.__version__, "from", numpy.__file__, "timm", importlib.metadata.version("timm"))
try:
    import httpx2  # noqa: F401
    print("httpx2 present")
except ImportError:
    print("without httpx2")
PY
}

run_layer() {  # name, then pytest arguments; everything goes to the layer's log
    local name=$1; shift
    export PYTHONPATH="$LAYERS/$name:$PWD" OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1
    echo "=== compatibility: $name: $(describe)"
    "$PY" -m pytest -q -p no:cacheprovider --basetemp="$LAYERS/tmp-$name" \
        ${MED3D_CI_REPORTS:+--junitxml="$MED3D_CI_REPORTS/compat-$name.xml"} "$@"
}

for name in "${NAMES[@]}"; do
    while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do wait -n || true; done
    if [ "${TESTS[$name]:0:3}" = "-m " ]; then
        args=(-m "${TESTS[$name]:3}")
    else
        read -ra args <<< "${TESTS[$name]}"
    fi
    ( set +e; run_layer "$name" "${args[@]}" "$@" > "$LAYERS/$name.log" 2>&1; echo $? > "$LAYERS/$name.status" ) &
done
wait

failed=()
for name in "${NAMES[@]}"; do
    cat "$LAYERS/$name.log"
    status=$(cat "$LAYERS/$name.status" 2>/dev/null || echo "none")
    [ "$status" = 0 ] || failed+=("$name (exit $status)")
done
if [ "${#failed[@]}" -gt 0 ]; then
    echo "=== compatibility FAILED: ${failed[*]}"
    exit 1
fi
echo "=== compatibility: all layers passed"
