"""The README stays a page a practitioner reads, with the reference in docs/: every relative link in
the Markdown pages reaches a file, and every #anchor a heading of it (GitHub's rule for anchors)."""

import glob
import os
import re

from helpers import ROOT

README_LIMIT = 15_000  # bytes: what it keeps is listed in issue 15; the rest goes to docs/


def pages() -> list[str]:
    return [os.path.join(ROOT, "README.md"), os.path.join(ROOT, "BENCHMARKS.md"),
            *sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))]


def anchors(path: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces as hyphens, repeats numbered."""
    found, seen = set(), {}
    text = re.sub(r"```.*?```", "", open(path, encoding="utf-8").read(), flags=re.S)
    for heading in re.findall(r"^#+ (.+)$", text, flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        found.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
        seen[slug] = seen.get(slug, 0) + 1
    return found


def broken_links(page: str) -> list[str]:
    text = re.sub(r"```.*?```", "", open(page, encoding="utf-8").read(), flags=re.S)
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue  # a web address: not checked offline
        file, _, anchor = target.partition("#")
        path = os.path.normpath(os.path.join(os.path.dirname(page), file)) if file else page
        if not os.path.exists(path) or (anchor and anchor not in anchors(path)):
            broken.append(target)
    return broken


def test_every_link_between_the_pages_resolves():
    assert len(pages()) > 10  # the README, BENCHMARKS.md and the docs/ pages
    assert {os.path.basename(page): broken_links(page) for page in pages() if broken_links(page)} == {}


def test_the_link_check_finds_a_missing_page_and_a_missing_heading(tmp_path):
    (tmp_path / "other.md").write_text("# A heading\n\n## Another `one`, with words\n")
    page = tmp_path / "page.md"
    page.write_text("[ok](other.md#a-heading) [ok](other.md#another-one-with-words) [web](https://x.org/y)\n"
                    "[gone](missing.md) [no heading](other.md#nowhere)\n")
    assert broken_links(str(page)) == ["missing.md", "other.md#nowhere"]


def test_the_readme_stays_short():
    assert os.path.getsize(os.path.join(ROOT, "README.md")) < README_LIMIT
