"""The module map of README.md and docs/CONTRACTS.md, generated from the tree (each module's docstring).

    python docs/layout.py            # print the map
    python docs/layout.py --write    # rewrite the map between the markers in README.md and CONTRACTS.md

tests/test_layout.py fails when a file's map differs from what this prints, so the map names every
module and says what the module itself says it is.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- layout: begin (python docs/layout.py --write) -->", "<!-- layout: end -->"
TARGETS = (ROOT / "README.md", ROOT / "docs" / "CONTRACTS.md")


def summary(path: Path) -> str:
    doc = ast.get_docstring(ast.parse(path.read_text())) or ""
    first = doc.strip().split("\n\n")[0].replace("\n", " ")
    return " ".join(first.split())


def module_map() -> str:
    lines = []
    for path in sorted((ROOT / "tally").rglob("*.py"), key=lambda p: (p.parent != ROOT / "tally", str(p))):
        rel = path.relative_to(ROOT)
        if path.name == "__init__.py":
            rel = f"{rel.parent}/"
            if str(rel) == "tally/":
                continue
        lines.append(f"{rel!s:28s} {summary(path)}")
    return "```\n" + "\n".join(lines) + "\n```"


def replaced(text: str, block: str) -> str:
    start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
    return text[:start] + "\n" + block + "\n" + text[end:]


def main() -> int:
    block = module_map()
    if "--write" not in sys.argv:
        print(block)
        return 0
    for target in TARGETS:
        target.write_text(replaced(target.read_text(), block))
        print(f"wrote the module map into {target.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
