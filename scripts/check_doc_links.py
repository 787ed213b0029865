"""Check that every relative link in README.md and docs/**/*.md resolves to a file, and that every
`docs/...` path quoted in backticks exists.

    python scripts/check_doc_links.py        # exits 1 and lists what is broken
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
QUOTED = re.compile(r"`(docs/[^`*\s]+)`")
FENCE = re.compile(r"^```.*?^```", re.DOTALL | re.MULTILINE)


def slug(heading: str) -> str:
    """The anchor GitHub and MkDocs give a heading (close enough for ASCII headings)."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    text = re.sub(r"[^\w\s-]", "", text)
    return re.sub(r"\s+", "-", text)


def anchors(path: Path) -> set[str]:
    text = FENCE.sub("", path.read_text(encoding="utf-8"))
    return {slug(m.group(1)) for m in re.finditer(r"^#+\s+(.*)$", text, re.MULTILINE)}


def problems(page: Path) -> list[str]:
    text = FENCE.sub("", page.read_text(encoding="utf-8"))
    found = []
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target):
            continue  # http(s), mailto
        path_part, _, anchor = target.partition("#")
        resolved = (page.parent / path_part).resolve() if path_part else page
        if not resolved.exists():
            found.append(f"{page.relative_to(ROOT)}: link {target} -> missing {resolved}")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            found.append(f"{page.relative_to(ROOT)}: link {target} -> no heading #{anchor}")
    for quoted in QUOTED.findall(text):
        if not (ROOT / quoted).exists():
            found.append(f"{page.relative_to(ROOT)}: quoted path {quoted} does not exist")
    return found


def main() -> int:
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    broken = [problem for page in pages for problem in problems(page)]
    print("\n".join(broken) or f"{len(pages)} pages: every relative link resolves")
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
