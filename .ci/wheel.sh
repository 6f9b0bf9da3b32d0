#!/usr/bin/env bash
# Wheel stage: the package as users get it. Build the wheel, install it into a fresh virtual
# environment, and run what a user runs first (.ci/wheel_check.py) from an empty folder, with no
# source tree on sys.path: a file missing from the wheel, or an import of tests/ or benchmarks/,
# fails here. The dependencies are the CI environment's, reached through one .pth line (its
# .pth files, the editable install among them, stay unread), so torch is not installed twice.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
echo "=== wheel: building"
"$PY" -m pip wheel --quiet --no-deps --wheel-dir "$WORK/dist" .
rm -rf build  # setuptools' staging copy of the package
wheel=$(ls "$WORK"/dist/med3d_hub-*.whl)
echo "=== wheel: $(basename "$wheel") into a fresh environment"
python3 -m venv --without-pip "$WORK/venv"
venv_site=$("$WORK/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
"$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' > "$venv_site/ci-dependencies.pth"
# pip of the CI environment, installing into the new one; --ignore-installed: the editable
# med3d-hub of the CI environment is visible through the .pth line and stays where it is.
"$PY" -m pip --python "$WORK/venv/bin/python" install --quiet --no-deps --ignore-installed "$wheel"
"$PY" -m pip --python "$WORK/venv/bin/python" check
mkdir "$WORK/user"
cd "$WORK/user"
env -u PYTHONPATH MED3D_WHEEL_VENV="$WORK/venv" MPLBACKEND=Agg "$WORK/venv/bin/python" -I "$OLDPWD/.ci/wheel_check.py"
