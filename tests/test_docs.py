"""The README is the product page: short, every relative link and anchor resolves, and every headline figure it keeps
is in the docs/results.md section it links to (where the command, host and date stand)."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
README_LIMIT = 20 * 1024      # issue 22: the README is a product page, the measured tables live in docs/results.md
LINK = re.compile(r"\]\(([^)#\s]+\.md|[^)#\s]+\.png)?(?:#([\w-]+))?\)")
# A figure: a number not glued to a word or a path (so "DINOv2" or "ViT-S/14" hold none).
FIGURE = re.compile(r"(?<![A-Za-z/_.\d-])\d+(?:\.\d+)?")


def _anchors(text: str) -> set[str]:
    return set(re.findall(r'<a id="([\w-]+)"></a>', text))


def _section(text: str, anchor: str) -> str:
    """From the anchor to the next anchor."""
    start = text.index(f'<a id="{anchor}"></a>')
    following = text.find('<a id="', start + 1)
    return text[start:following if following != -1 else len(text)]


def _headline_lines(readme: str) -> list[str]:
    section = readme[readme.index("## Headline figures"):]
    section = section[:section.index("\n## ", 1)]
    return [item.replace("\n", " ") for item in re.split(r"\n- ", section)[1:]]


def test_the_readme_stays_a_product_page():
    assert README.stat().st_size <= README_LIMIT, f"README.md is {README.stat().st_size} bytes"


def test_every_relative_link_of_the_readme_and_docs_resolves():
    for page in [README, *sorted((ROOT / "docs").glob("*.md"))]:
        for target, anchor in LINK.findall(page.read_text()):
            path = (page.parent / target) if target else page
            assert path.is_file(), f"{page.name} links to a missing {target}"
            if anchor:
                assert anchor in _anchors(path.read_text()), f"{page.name} links to a missing #{anchor} in {path.name}"


def test_every_headline_figure_is_in_the_results_section_it_links_to():
    results = (ROOT / "docs" / "results.md").read_text()
    lines = _headline_lines(README.read_text())
    assert len(lines) >= 5
    for line in lines:
        anchors = [anchor for target, anchor in LINK.findall(line) if target == "docs/results.md"]
        assert anchors, f"headline without a link to docs/results.md: {line}"
        section = _section(results, anchors[0])
        missing = [figure for figure in FIGURE.findall(line) if figure not in section]
        assert not missing, f"{missing} of '{line[:60]}...' are not in docs/results.md#{anchors[0]}"


def test_the_readme_demo_output_is_the_recorded_run_it_links_to():
    readme = README.read_text()
    quoted = readme[readme.index("[the whole output, host and date](docs/results.md#demo-run)"):]
    quoted = quoted[quoted.index("```\n") + 4:]
    quoted = quoted[:quoted.index("```")].splitlines()
    recorded = _section((ROOT / "docs" / "results.md").read_text(), "demo-run")
    assert quoted[0].startswith("Run: ") and quoted[1].startswith("Verdict: ")
    assert [line for line in quoted if line not in recorded.splitlines()] == []
