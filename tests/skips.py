"""When a test may skip: never over a broken import of our own package, and in CI never over what CI installs.

``needs(available, what, install)`` skips a test whose system requirement is missing on a developer's
machine and fails it when ``CI=true``: ``.ci/run`` installs it, so its absence there is a broken CI
that would otherwise pass by skipping. The hooks below turn a skip that an ``ImportError`` of
``med3d_hub`` caused into a failure, wherever it was raised (a regression must not read as a skip).
"""

from __future__ import annotations

import os

import pytest

__all__ = ["needs", "pytest_make_collect_report", "pytest_runtest_makereport"]

OUR_PACKAGE = "med3d_hub"


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() == "true"


def needs(available: bool, what: str, install: str) -> None:
    """Skip the test without ``what`` (``install`` adds it); fail it in CI, which installs it."""
    if available:
        return
    if in_ci():
        pytest.fail(f"{what} is missing, and CI installs it ({install}): the test would have skipped", pytrace=False)
    pytest.skip(f"{what} is not installed ({install})")


def _names_our_package(text: str) -> bool:
    return f"module named '{OUR_PACKAGE}" in text or f"import '{OUR_PACKAGE}" in text or f"from '{OUR_PACKAGE}" in text


def our_import_error(exc: BaseException | None) -> BaseException | None:
    """The ImportError of our own package in ``exc`` or behind it (``raise ... from``, or raised while handling)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, ImportError) and (
            (exc.name or "").split(".")[0] == OUR_PACKAGE or _names_our_package(str(exc))
        ):
            return exc
        if isinstance(exc, pytest.skip.Exception) and _names_our_package(str(exc)):  # pytest.importorskip's message
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def _as_failure(report, why: str):
    report.outcome = "failed"
    report.longrepr = f"a skip hid a broken import of {OUR_PACKAGE}, a failure: {why}"
    return report


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.skipped and not hasattr(report, "wasxfail") and call.excinfo is not None:
        hidden = our_import_error(call.excinfo.value)
        if hidden is not None:
            return _as_failure(report, f"{type(hidden).__name__}: {hidden}")
    return report


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector):
    """A module skipped at import (``pytest.importorskip``, ``pytest.skip(allow_module_level=True)``)."""
    report = yield
    if report.skipped and isinstance(report.longrepr, tuple) and _names_our_package(str(report.longrepr[-1])):
        return _as_failure(report, str(report.longrepr[-1]))
    return report
