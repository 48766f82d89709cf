"""The project's promises that live in text: the README's two commands, CI and the toc.

The README's quick start is what a new reader runs; CI must run its test command verbatim,
and chapter 1 quotes both commands, so the three cannot drift apart unnoticed.
"""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    """The commands of the README's quick-start block (comment lines dropped)."""
    text = (ROOT / "README.md").read_text()
    match = re.search(r"## Quick start\n.*?```bash\n(.*?)```", text, re.DOTALL)
    assert match, "README.md needs a '## Quick start' section with a ```bash block"
    return [line.strip() for line in match.group(1).splitlines() if line.strip() and not line.startswith("#")]


def test_readme_quick_start_has_the_main_job_and_the_test_command():
    main_job, test = readme_commands()
    assert "python -m shaq train" in main_job
    assert "pytest" in test and "tests" in test and "book" in test and "--nbmake" in test


def test_ci_runs_the_readme_test_command_verbatim():
    _, test = readme_commands()
    test_part = test.split("&&")[-1].strip()  # CI installs torch's CPU wheel first, then the same
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert test_part in ci_lines, f".ci/run must run {test_part!r}"


def test_chapter_one_quotes_the_readme_commands():
    chapter = (ROOT / "book" / "01_introduction.md").read_text()
    for command in readme_commands():
        assert command in chapter, f"book/01_introduction.md should quote {command!r}"


def test_toc_lists_every_chapter_and_only_files_that_exist():
    toc = (ROOT / "_toc.yml").read_text()
    listed = re.findall(r"^\s*-?\s*(?:file|root):\s*(\S+)", toc, re.MULTILINE)
    for entry in listed:
        matches = [p for p in (ROOT / (entry + ext) for ext in (".md", ".ipynb")) if p.exists()]
        assert len(matches) == 1, f"_toc.yml lists {entry}, which should be exactly one .md or .ipynb"
    notebooks = {f"book/{p.stem}" for p in (ROOT / "book").glob("*.ipynb")}
    assert notebooks <= set(listed), f"notebooks missing from _toc.yml: {sorted(notebooks - set(listed))}"
