"""The README documents every finding code and starts with the two commands."""

from pathlib import Path

from lightning_recipe.findings import CATALOG

ROOT = Path(__file__).resolve().parents[1]


def test_readme_lists_every_code_and_starts_with_the_commands():
    text = (ROOT / "README.md").read_text()
    head = text.split("```")[1]
    assert "make demo" in head and "make test" in head
    for code in CATALOG:
        assert f"`{code}`" in text, code


def test_ci_runs_the_readme_test_command():
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_readme_lists_every_callback_and_demo_bug_and_its_pictures_exist():
    import re

    from lightning_recipe.demo import BUGS
    from lightning_recipe.suite import SUITE

    text = (ROOT / "README.md").read_text()
    for _, cls in SUITE:
        assert f"| `{cls.__name__}` |" in text, cls.__name__
    for bug in BUGS:
        assert f"| `{bug}` |" in text, bug
    pictures = re.findall(r"\]\((docs/images/[^)]+\.png)\)", text)
    assert len(pictures) >= 5
    for rel in pictures:
        path = ROOT / rel
        assert path.exists() and path.read_bytes()[:4] == b"\x89PNG", rel


def _github_anchor(heading: str) -> str:
    """The anchor GitHub gives a markdown heading: lower case, punctuation dropped, spaces -> '-'."""
    import re

    text = heading.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(markdown: str) -> set[str]:
    import re

    seen: dict[str, int] = {}
    out = set()
    in_code = False
    for line in markdown.splitlines():
        if line.startswith("```"):
            in_code = not in_code
        m = None if in_code else re.match(r"#{1,6} (.+)$", line)
        if m:
            base = _github_anchor(m.group(1))
            n = seen.get(base, 0)
            seen[base] = n + 1
            out.add(base if n == 0 else f"{base}-{n}")
    return out


def test_callback_docstrings_are_short_and_link_their_thresholds():
    import inspect
    import re

    from lightning_recipe.suite import SUITE

    anchors = _anchors((ROOT / "docs" / "thresholds.md").read_text())
    for _, cls in SUITE:
        doc = inspect.getdoc(cls) or ""
        lines = doc.splitlines()
        assert len(lines) <= 45, f"{cls.__name__}: {len(lines)} docstring lines (at most 45)"
        assert "Args:" in doc and "Example" in doc, cls.__name__
        links = re.findall(r"docs/thresholds\.md#([\w-]+)", doc)
        assert links, f"{cls.__name__} does not link to docs/thresholds.md"
        for anchor in links:
            assert anchor in anchors, f"{cls.__name__}: no heading for #{anchor} in docs/thresholds.md"
        for code in getattr(cls, "codes", ()):
            assert f"``{code}``" in doc, f"{cls.__name__} does not name its code {code}"


def test_thresholds_page_covers_every_code_and_the_readme_links_to_it():
    import re

    from lightning_recipe.findings import CATALOG

    page = (ROOT / "docs" / "thresholds.md").read_text()
    anchors = _anchors(page)
    for code in CATALOG:
        if code in ("check-skipped", "internal-error"):
            continue  # no threshold behind them
        assert f"`{code}`" in page, code
    for anchor in re.findall(r"\]\(#([\w-]+)\)", page):
        assert anchor in anchors, anchor
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Where the numbers come from", 1)[1].split("\n## ", 1)[0]
    assert "(docs/thresholds.md)" in section
