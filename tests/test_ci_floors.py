"""The floors CI tests (.ci/floors.txt) are pyproject.toml's lower bounds: raising one raises the other."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def lower_bounds() -> dict[str, str]:
    """The core dependencies' ``name>=X`` in pyproject.toml."""
    block = re.search(r"^dependencies = \[(.*?)^\]", (ROOT / "pyproject.toml").read_text(), re.S | re.M)[1]
    return dict(re.findall(r'"([A-Za-z0-9_.-]+)>=([0-9.]+)', block))


def pins() -> dict[str, str]:
    lines = (ROOT / ".ci" / "floors.txt").read_text().splitlines()
    return dict(line.split("==") for line in lines if line.strip() and not line.startswith("#"))


def test_every_core_dependency_is_pinned_at_its_oldest_release():
    bounds, pinned = lower_bounds(), pins()
    assert set(bounds) <= set(pinned), f"not tested at their floor: {set(bounds) - set(pinned)}"
    for name, bound in bounds.items():
        # the oldest release of the bound's series: 2.1 -> 2.1.0, 1.0 -> 1.0.3 (the first 1.0 on PyPI)
        assert pinned[name] == bound or pinned[name].startswith(bound + "."), (name, bound, pinned[name])
