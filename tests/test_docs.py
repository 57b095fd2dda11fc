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
