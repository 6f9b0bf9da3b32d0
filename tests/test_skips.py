"""The skip rules of tests/skips.py, run on small test files by pytest itself (pytester)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

BROKEN_IMPORTS = '''
import pytest

def test_skipped_on_an_import_error_of_the_package():
    try:
        import med3d_hub.no_such_module  # noqa: F401
    except ImportError:
        pytest.skip("not available in this build")

def test_skipped_on_an_import_error_of_another_package():
    try:
        import no_such_package_anywhere  # noqa: F401
    except ImportError:
        pytest.skip("an optional extra")
'''


def run(pytester, monkeypatch, source: str, *args: str):
    """pytest in a fresh process (med3d_hub and numpy import once per process) with tests/skips.py as a plugin."""
    pytester.makepyfile(test_rules=source)
    tests = str(Path(__file__).parent)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (tests, os.environ.get("PYTHONPATH")) if p))
    return pytester.runpytest_subprocess("-p", "skips", "-rs", "-p", "no:cacheprovider", *args)


def test_an_import_error_of_our_package_fails_where_another_one_skips(pytester, monkeypatch):
    result = run(pytester, monkeypatch, BROKEN_IMPORTS)
    result.assert_outcomes(failed=1, skipped=1)
    result.stdout.fnmatch_lines(["*a skip hid a broken import of med3d_hub*No module named 'med3d_hub.no_such_module'*"])


def test_a_module_skipped_by_importorskip_of_our_package_fails(pytester, monkeypatch):
    result = run(pytester, monkeypatch, 'import pytest\npytest.importorskip("med3d_hub.no_such_module")\n\ndef test_x():\n    pass\n')
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*a skip hid a broken import of med3d_hub*"])


NEEDS = '''
from skips import needs

def test_needs_a_missing_system_file():
    needs(False, "/nowhere/Cranium.inv3 (Debian's invesalius-examples)", "apt-get install invesalius-examples")
'''


@pytest.mark.parametrize("ci, outcome", [("true", "failed"), ("", "skipped")])
def test_what_ci_installs_fails_in_ci_and_skips_elsewhere(pytester, monkeypatch, ci, outcome):
    monkeypatch.setenv("CI", ci)
    result = run(pytester, monkeypatch, NEEDS)
    result.assert_outcomes(**{outcome: 1})
    result.stdout.fnmatch_lines(["*Cranium.inv3*apt-get install invesalius-examples*"])
