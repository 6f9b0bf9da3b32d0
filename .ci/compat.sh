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
# Override with MED3D_COMPAT_HUB_VERSIONS="0.30.2 1.0.0 ..." (MED3D_COMPAT_FLOORS=0 skips the floors);
# arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
VERSIONS=${MED3D_COMPAT_HUB_VERSIONS:-0.25.2 0.36.2 1.33.0}
LAYERS=$(mktemp -d)
trap 'rm -rf "$LAYERS"' EXIT

echo "=== compatibility: huggingface_hub $("$PY" -c 'import huggingface_hub as h; print(h.__version__)') (main environment, full suite above)"
for version in $VERSIONS; do
    layer="$LAYERS/hf-$version"
    "$PY" -m pip install --quiet --disable-pip-version-check --target "$layer" --no-deps "huggingface_hub==$version"
    case "$version" in
        1.*) "$PY" -c "import httpx" 2>/dev/null ||
                 "$PY" -m pip install --quiet --disable-pip-version-check --target "$layer" "httpx>=0.23,<1" ;;
    esac
    case "$version" in
        2.*) ;;
        *) mkdir -p "$layer/httpx2"
           echo "raise ModuleNotFoundError('No module named httpx2 (hidden: huggingface_hub $version environments lack it)', name='httpx2')" \
               > "$layer/httpx2/__init__.py" ;;
    esac
    export PYTHONPATH="$layer:$PWD"
    echo "=== compatibility: $("$PY" -c 'import huggingface_hub as h, sys
print("huggingface_hub", h.__version__, "from", h.__file__)
try:
    import httpx2
    print("httpx2 present")
except ImportError as e:
    print("without httpx2")' | paste -sd' ')"
    "$PY" -m pytest -m "hub and not slow" -q -p no:cacheprovider "$@"
done

# Declared floors of numpy and timm, on the tests that lean on them. numpy 1.26 comes with a pandas
# built for numpy 1.x (as such environments have): the main environment's pandas needs numpy 2.
[ "${MED3D_COMPAT_FLOORS:-1}" = 0 ] && exit 0
for spec in "numpy==1.26.4 pandas==2.2.3:tests/test_preprocess.py tests/test_io.py" \
            "timm==1.0.3:tests/test_timm_tools.py"; do
    requirements=${spec%%:*}
    first=${requirements%% *}
    layer="$LAYERS/${first/==/-}"
    # shellcheck disable=SC2086
    "$PY" -m pip install --quiet --disable-pip-version-check --target "$layer" --no-deps $requirements
    export PYTHONPATH="$layer:$PWD"
    echo "=== compatibility: $requirements ($("$PY" -c "import ${first%%==*} as m; print(m.__version__, 'from', m.__file__)"))"
    # shellcheck disable=SC2086
    "$PY" -m pytest -q -p no:cacheprovider ${spec#*:}
done
