"""The README and docs/ pages link only to files that exist (relative links and images)."""
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
# [text](target) and ![alt](target); the target ends at whitespace or ")" (titles are not used here).
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)[^)]*\)")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)


def relative_targets(text: str) -> list[str]:
    """Relative link and image targets of a Markdown page, without anchors, outside code blocks."""
    targets = []
    for target in LINK.findall(FENCE.sub("", text)):
        if re.match(r"[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue  # URLs (http:, mailto:) and same-page anchors
        targets.append(target.split("#", 1)[0])
    return targets


def test_link_parser_finds_links_and_images_but_not_urls_or_code():
    text = "see [a](docs/a.md#x) and ![p](img/p.png), [web](https://x.org), [here](#top)\n```\n[c](nope.md)\n```\n"
    assert relative_targets(text) == ["docs/a.md", "img/p.png"]


def test_docs_pages_exist():
    assert {p.name for p in PAGES} >= {"README.md", "results.md", "benchmarks.md", "scaling.md", "errors.md"}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_and_image_exists(page):
    missing = [t for t in relative_targets(page.read_text(encoding="utf-8")) if not (page.parent / t).exists()]
    assert not missing, f"{page.relative_to(REPO)} links to missing files: {missing}"
