"""Every relative link in README.md and docs/*.md reaches an existing file, and every `page.md#anchor`
an existing heading of that page (GitHub's anchors); every page is reachable from the index.
External http(s) links are not checked (tests stay offline)."""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

FENCE = re.compile(r"^ {0,3}(```|~~~).*?^ {0,3}\1[^\n]*$", re.M | re.S)
CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1", re.S)
INLINE_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE_DEF = re.compile(r"(?m)^ {0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+\"[^\"]*\")?\s*$")
HEADING = re.compile(r"(?m)^ {0,3}(#{1,6})[ \t]+(.*?)[ \t#]*$")
EXTERNAL = ("http://", "https://", "mailto:")


def prose(markdown: str) -> str:
    """The text outside fenced code blocks (a `# comment` in a bash block is not a heading)."""
    return FENCE.sub("", markdown)


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: its rendered text lower-cased, every character but
    letters, digits, `_`, `-` and spaces dropped, each space a hyphen (github-slugger)."""
    text = CODE_SPAN.sub(lambda m: m.group(0).strip("`"), heading)
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", text)  # a link in a heading shows its text
    text = text.replace("*", "")
    return "".join(c for c in text.lower() if c.isalnum() or c in "_- ").replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """Every heading anchor of a page; a repeated heading gets -1, -2, … as on GitHub."""
    seen: dict[str, int] = {}
    out = set()
    for _, title in HEADING.findall(prose(page.read_text(encoding="utf-8"))):
        slug = github_slug(title)
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def links(page: Path) -> list[str]:
    """The targets of a page's inline links, images and reference definitions, outside code."""
    text = CODE_SPAN.sub("", prose(page.read_text(encoding="utf-8")))
    return INLINE_LINK.findall(text) + REFERENCE_DEF.findall(text)


def broken_links(page: Path, root: Path = ROOT) -> list[str]:
    """Each relative link of ``page`` whose file, or whose `#anchor` in a .md file, does not exist."""
    problems = []
    for target in links(page):
        if not target or target.lower().startswith(EXTERNAL):
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page.resolve()
        if not dest.exists():
            problems.append(f"{target}: no such file {dest.relative_to(root.resolve()) if dest.is_relative_to(root.resolve()) else dest}")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            problems.append(f"{target}: no heading with anchor #{anchor} in {dest.name}")
    return problems


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves_in(page):
    problems = broken_links(page)
    assert not problems, f"{page.relative_to(ROOT)}: broken links:\n" + "\n".join(problems)


def test_every_docs_page_is_linked_from_the_index_and_the_index_from_the_readme():
    index = ROOT / "docs" / "README.md"
    assert "docs/README.md" in links(ROOT / "README.md")
    linked = {(index.parent / t.partition("#")[0]).resolve() for t in links(index)}
    orphans = [p.name for p in PAGES[1:] if p != index and p.resolve() not in linked]
    assert not orphans, f"docs pages missing from docs/README.md: {orphans}"


def test_github_slug_matches_githubs_anchors():
    # Anchors GitHub renders for headings of this kind (inline code, punctuation, dashes, underscores).
    assert github_slug("Know the cost first: `--estimate` and `--batch-size auto`") == "know-the-cost-first---estimate-and---batch-size-auto"
    assert github_slug('make_diamonds.py — pseudo-labels ("diamonds")') == "make_diamondspy--pseudo-labels-diamonds"
    assert github_slug("`make bench`: the cost of the README recipe, and the original's way against ours") == \
        "make-bench-the-cost-of-the-readme-recipe-and-the-originals-way-against-ours"
    assert github_slug("Use a trained detector (`detect.py`)") == "use-a-trained-detector-detectpy"


def test_broken_links_names_a_missing_file_a_missing_anchor_and_skips_code_and_the_web(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("# Top\n\n## Top\n\n```bash\n# not a heading\n```\n")
    page = tmp_path / "README.md"
    page.write_text(
        "# Here\n\n"
        "[ok](docs/a.md) [ok anchor](docs/a.md#top) [repeated heading](docs/a.md#top-1) [self](#here)\n"
        "[gone](docs/missing.md) [bad anchor](docs/a.md#not-a-heading) [bad self](#nowhere)\n"
        "[web](https://example.com/x.md#y) `[in code](nope.md)`\n\n"
        "```\n[in a block](nope2.md)\n```\n\n[ref]: docs/also-missing.md\n")
    problems = broken_links(page, root=tmp_path)
    assert [p.split(":")[0] for p in problems] == ["docs/missing.md", "docs/a.md#not-a-heading", "#nowhere", "docs/also-missing.md"]
