"""docs/SPACES.md, the table of every method's search space, generated from the code
(tally.search.tuning.spaces_markdown: Method.space and SHARED_SPACE, the default point marked).

    python docs/spaces.py            # print the table
    python docs/spaces.py --write    # rewrite docs/SPACES.md

tests/search/test_tuning.py fails when docs/SPACES.md differs from what this prints.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGET = ROOT / "docs" / "SPACES.md"


def main() -> int:
    sys.path.insert(0, str(ROOT))
    from tally.search.tuning import spaces_markdown

    text = spaces_markdown()
    if "--write" not in sys.argv:
        print(text)
        return 0
    TARGET.write_text(text)
    print(f"wrote {TARGET.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
