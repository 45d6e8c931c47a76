"""Render the support table from the rule registry.

python -m funcadapt.table           # rewrite docs/support.md and README.md's table
python -m funcadapt.table --check   # exit 1 if either is stale (CI runs this)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .rules.base import RULES

BEGIN, END = "<!-- support-table:begin -->", "<!-- support-table:end -->"
HEADER = (
    '| adapter | rule | layers | `mode="linear"`: what c does | linear is | `mode="geometric"` | `op="invert"` '
    "| bitsandbytes |\n"
    "|---|---|---|---|---|---|---|---|\n"
)


def render() -> str:
    rows = []
    for rule in RULES:
        d = rule.doc
        cells = [d.adapter, f"`{rule.name}`", d.layers, d.linear, d.linear_exact, d.geometric, d.invert, d.quantized]
        rows.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return HEADER + "\n".join(rows) + "\n"


def _splice(text: str, table: str) -> str:
    head, _, rest = text.partition(BEGIN)
    _, _, tail = rest.partition(END)
    return f"{head}{BEGIN}\n{table}{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="fail if the files are not up to date")
    parser.add_argument("--root", type=Path, default=Path.cwd())
    args = parser.parse_args(argv)
    table = render()
    stale = []
    for path in (args.root / "docs" / "support.md", args.root / "README.md"):
        text = path.read_text(encoding="utf-8")
        if BEGIN not in text or END not in text:
            print(f"{path}: missing {BEGIN} / {END} markers", file=sys.stderr)
            return 1
        new = _splice(text, table)
        if new != text:
            stale.append(path)
            if not args.check:
                path.write_text(new, encoding="utf-8")
    if args.check and stale:
        print(f"stale support table in {', '.join(map(str, stale))}; run `python -m funcadapt.table`", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
