"""Regenerate the weights table of docs/pretrained.md from the shipped weights_manifest.json.

    python docs/update_weights_table.py          # rewrite the table in place
    python docs/update_weights_table.py --check  # exit 1 if the table is out of date
"""

import sys
from pathlib import Path

from med3d_hub.weights.manifest import render_into, shipped_entries, weights_table_markdown

DOC = Path(__file__).with_name("pretrained.md")


def main(argv: list[str]) -> int:
    text = DOC.read_text(encoding="utf-8")
    updated = render_into(text, weights_table_markdown(shipped_entries()))
    if "--check" in argv:
        if updated != text:
            print(f"{DOC} is out of date: run python docs/update_weights_table.py", file=sys.stderr)
            return 1
        return 0
    DOC.write_text(updated, encoding="utf-8")
    print(f"updated {DOC}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
