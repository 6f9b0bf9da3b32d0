"""The CI log's closing summary: passed, failed and skipped per stage, then why tests skipped.

Reads the folder .ci/run collects: STAGE.xml (pytest's --junitxml) for a test stage, STAGE.status
(one word) for a stage that is not a test run. Standard library only: it runs even when the
environment could not be built.

    python3 .ci/summary.py REPORTS_DIR
"""

from __future__ import annotations

import re
import sys
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

SHOWN_REASONS = 12  # per stage, the most frequent first


def skip_reason(skipped: ET.Element) -> str:
    """pytest's reason; a module skipped at collection keeps it in the text, after ``path:line: ``."""
    message = (skipped.get("message") or "").strip()
    if message in ("", "collection skipped"):
        text = (skipped.text or "").strip()
        at = re.match(r"""^\('.*?', \d+, ['"](?:Skipped: )?(.*)['"]\)$|^\S+:\d+: (.*)$""", text, re.S)
        message = (at and (at[1] or at[2]) or text) or "no reason given"
    return f"{message} (at collection)" if skipped.get("message") == "collection skipped" else message


def read_junit(path: Path) -> tuple[Counter, Counter]:
    """Outcome counts and skip reasons of one pytest run."""
    counts: Counter = Counter()
    reasons: Counter = Counter()
    for case in ET.parse(path).getroot().iter("testcase"):
        outcome = "passed"
        for child in case:
            if child.tag in ("failure", "error"):
                outcome = "failed"
            elif child.tag == "skipped" and outcome == "passed":
                outcome = "skipped"
                reasons[skip_reason(child)] += 1
        counts[outcome] += 1
    return counts, reasons


def main(folder: Path) -> int:
    stages = sorted({p.stem for p in folder.glob("*.xml")} | {p.stem for p in folder.glob("*.status")},
                    key=lambda s: min(p.stat().st_mtime for p in folder.glob(f"{s}.*")))
    total: Counter = Counter()
    skipped: dict[str, Counter] = {}
    print("=== summary: passed, failed, skipped per stage")
    for stage in stages:
        xml, status = folder / f"{stage}.xml", folder / f"{stage}.status"
        if xml.is_file():
            try:
                counts, reasons = read_junit(xml)
            except ET.ParseError as err:
                print(f"  {stage:<22} unreadable report {xml.name}: {err}")
                continue
            total.update(counts)
            skipped[stage] = reasons
            line = f"{counts['passed']} passed, {counts['failed']} failed, {counts['skipped']} skipped"
            if status.is_file():
                line += f" ({status.read_text().strip()})"
        else:
            line = status.read_text().strip()
        print(f"  {stage:<22} {line}")
    for stage, reasons in skipped.items():
        if reasons:
            print(f"=== skipped in {stage}, by reason:")
            for reason, n in reasons.most_common(SHOWN_REASONS):
                print(f"  {n:>4} x {reason[:200]}")
            if len(reasons) > SHOWN_REASONS:
                print(f"       ... and {len(reasons) - SHOWN_REASONS} other reasons")
    print(f"total: {total['passed']} passed, {total['failed']} failed, {total['skipped']} skipped")
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
