"""The house rules: the layers of docs/architecture.md are the package's, and the error boundary holds."""

from __future__ import annotations

import configparser
import errno
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import med3d_hub
from med3d_hub import errors
from med3d_hub.cli import app as cli
from med3d_hub.cli import zoo

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = Path(med3d_hub.__file__).parent
# the public surfaces over the layers (docs/architecture.md); nothing inside imports them
SURFACES = {"models", "train", "finetune", "features", "fid", "predict"}


def _layers() -> list[str]:
    contracts = configparser.ConfigParser()
    contracts.read(ROOT / ".importlinter")
    lines = contracts["importlinter:contract:layers"]["layers"].split("\n")
    return [name.strip().removeprefix("med3d_hub.") for line in lines for name in line.split("|") if name.strip()]


def test_every_folder_is_a_layer_or_a_surface_and_the_map_names_it():
    folders = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
    layers = set(_layers())
    assert folders - SURFACES <= layers, f"folders outside the layer contract: {sorted(folders - SURFACES - layers)}"
    doc = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    for name in sorted(folders | layers):
        assert f"`{name}/`" in doc or f"`{name}.py`" in doc, f"docs/architecture.md does not describe {name}"


def test_the_import_contracts_hold():
    lint = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or shutil.which("lint-imports")
    if lint is None:
        pytest.skip("import-linter is not installed (pip install .[test])")
    done = subprocess.run([lint, "--config", str(ROOT / ".importlinter")], cwd=ROOT, capture_output=True, text=True,
                          env={"PYTHONPATH": str(PACKAGE.parent), "PATH": str(Path(sys.executable).parent)})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]


def test_every_error_class_of_the_package_is_a_med3d_error_with_its_builtin_type():
    from med3d_hub.data.io import VolumeReadError
    from med3d_hub.publishing.publish import PublishError, PublishRefused
    from med3d_hub.training.config import ConfigError
    from med3d_hub.weights.hub import HubUnreachableError

    assert issubclass(ConfigError, errors.Med3DError) and issubclass(ConfigError, ValueError)
    assert issubclass(VolumeReadError, ValueError) and issubclass(HubUnreachableError, ConnectionError)
    assert errors.exit_code(HubUnreachableError("x")) == errors.EXIT_UNREACHABLE
    assert errors.exit_code(PublishError("x")) == errors.EXIT_PUBLISH_FAILED
    assert errors.exit_code(PublishRefused("x")) == errors.EXIT_USAGE
    assert errors.exit_code(PermissionError(errno.EACCES, "denied")) == errors.EXIT_USAGE  # the user's machine
    assert errors.exit_code(ValueError("x")) == errors.EXIT_INTERNAL  # not ours: a bug
    with pytest.raises(ValueError, match="unknown model"):  # callers that catch the built-in still do
        med3d_hub.create_model("resnet11")


def test_the_cli_reports_a_user_error_in_one_line_and_a_bug_as_internal(capsys, monkeypatch):
    assert cli.main(["info", "resnet11"]) == errors.EXIT_USAGE
    err = capsys.readouterr().err
    assert err.startswith("med3d: error: unknown model 'resnet11'") and "Traceback" not in err

    def broken(args):
        raise ValueError("an index went wrong inside the package")

    monkeypatch.setattr(zoo, "cmd_list", broken)
    assert cli.main(["list"]) == errors.EXIT_INTERNAL
    err = capsys.readouterr().err
    assert "internal error: ValueError: an index went wrong" in err and "--debug" in err
    assert cli.main(["--debug", "list"]) == errors.EXIT_INTERNAL
    assert "Traceback" in capsys.readouterr().err
