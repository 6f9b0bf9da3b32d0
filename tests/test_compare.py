"""``med3d compare``: curves against step and wall time (PNG), steps-to-target and speed-up (table)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

from med3d_hub.cli.app import main as med3d  # noqa: E402
from med3d_hub.publishing.compare import CompareError, compare_runs, format_table  # noqa: E402


def _run(folder: Path, dice: dict[int, float], seconds_per_step: float = 2.0, metric: str = "dice_mean") -> Path:
    folder.mkdir(parents=True)
    t0 = 1_000_000.0
    lines = []
    for step in range(10, max(dice) + 1, 10):
        lines.append({"time": t0 + step * seconds_per_step, "kind": "train", "step": step, "loss": 1.0})
        if step in dice:
            lines.append({"time": t0 + step * seconds_per_step + 1, "kind": "val", "step": step, metric: dice[step]})
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"kind": "val", "st')
    return folder


@pytest.fixture
def runs(tmp_path):
    pretrained = _run(tmp_path / "pretrained", {20: 0.5, 40: 0.85, 60: 0.9, 80: 0.92, 100: 0.93})
    scratch = _run(tmp_path / "scratch", {20: 0.1, 40: 0.3, 60: 0.5, 80: 0.7, 100: 0.86}, seconds_per_step=1.0)
    return pretrained, scratch


def test_steps_to_target_and_speedup(runs):
    metric, goal, curves = compare_runs(runs)
    assert metric == "dice_mean"
    assert goal == pytest.approx(0.9 * 0.93)
    pre, scr = curves
    assert (pre.final, pre.best, pre.steps_to_target) == (0.93, 0.93, 40)
    assert scr.steps_to_target == 100 and scr.final == 0.86
    assert pre.speedup == pytest.approx(2.5) and not pre.speedup_lower_bound
    assert pre.seconds_to_target == pytest.approx(40 * 2.0 + 1)  # start extrapolated from the first logged steps
    table = format_table(metric, goal, curves)
    assert "| pretrained | 0.9300 | 0.9300 | 100 | 40 | 81 s | 2.50x |" in table
    assert "| scratch | 0.8600 | 0.8600 | 100 | 100 | 101 s | 1.00x |" in table


def test_a_baseline_that_never_reaches_the_target_gives_a_lower_bound(runs, tmp_path):
    slow = _run(tmp_path / "slow", {50: 0.2, 100: 0.4})
    metric, goal, curves = compare_runs([runs[0], slow], target=0.9)
    assert curves[1].steps_to_target is None
    assert curves[0].speedup == pytest.approx(100 / 40) and curves[0].speedup_lower_bound
    table = format_table(metric, goal, curves)
    assert "not reached (> 100)" in table and ">= 2.50x" in table


def test_cli_writes_the_png_and_prints_the_table(runs, tmp_path, capsys):
    png = tmp_path / "out" / "cmp.png"
    assert med3d(["compare", *map(str, runs), "--output", str(png), "--label", "Med3D", "--label", "scratch"]) == 0
    out = capsys.readouterr().out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "steps to target" in out and "| Med3D |" in out and "speed-up vs scratch" in out

    assert med3d(["compare", *map(str, runs), "--output", str(png), "--json", "--target", "0.5"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["metric"] == "dice_mean" and [r["steps_to_target"] for r in data["runs"]] == [20, 60]


def test_classification_runs_default_to_accuracy(tmp_path):
    a = _run(tmp_path / "a", {10: 0.6, 20: 0.8}, metric="accuracy")
    b = _run(tmp_path / "b", {10: 0.5, 20: 0.7}, metric="accuracy")
    metric, _, curves = compare_runs([a, b])
    assert metric == "accuracy" and [c.steps_to_target for c in curves] == [20, None]  # target 0.72


def test_errors_name_the_run(runs, tmp_path, capsys):
    with pytest.raises(CompareError, match="no metrics.jsonl"):
        compare_runs([runs[0], tmp_path])
    with pytest.raises(CompareError, match="no validation values of 'auc'.*dice_mean"):
        compare_runs(runs, metric="auc")
    assert med3d(["compare", str(runs[0]), str(tmp_path / "nope"), "-o", str(tmp_path / "x.png")]) == 2
    assert "no such run folder" in capsys.readouterr().err
