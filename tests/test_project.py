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
    return [
        line.strip()
        for line in match.group(1).splitlines()
        if line.strip() and not line.startswith("#")
    ]


def test_readme_quick_start_has_the_main_job_and_the_test_command():
    main_job, test = readme_commands()
    assert "python -m shaq train" in main_job
    assert "pytest" in test and "tests" in test and "book" in test and "--nbmake" in test


def ci_commands() -> list[str]:
    """The lines of .ci/run, stripped, without blank lines and comments."""
    lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def test_ci_runs_the_readme_test_command_verbatim():
    _, test = readme_commands()
    install, test_part = (part.strip() for part in test.split("&&"))
    assert install.startswith("pip install "), install
    ci = ci_commands()
    assert test_part in ci, f".ci/run must run {test_part!r}"
    # ... after installing exactly as the README says (torch's CPU wheel first; `python -m pip`
    # and -q allowed), into a new virtual environment that sees nothing of the machine's packages.
    pattern = r"(python -m )?pip install (-q )?" + re.escape(install.removeprefix("pip install "))
    installs = [i for i, line in enumerate(ci) if re.fullmatch(pattern, line)]
    assert installs, f".ci/run must install with {install!r}"
    venvs = [i for i, line in enumerate(ci) if " -m venv " in line]
    assert venvs and venvs[0] < installs[0] < ci.index(test_part), (
        "new venv, then the install, then the tests"
    )
    assert "--system-site-packages" not in "\n".join(ci)


def test_chapter_one_quotes_the_readme_commands():
    chapter = (ROOT / "book" / "01_introduction.md").read_text()
    for command in readme_commands():
        assert command in chapter, f"book/01_introduction.md should quote {command!r}"


def test_toc_lists_every_chapter_and_only_files_that_exist():
    toc = (ROOT / "_toc.yml").read_text()
    listed = re.findall(r"^\s*-?\s*(?:file|root):\s*(\S+)", toc, re.MULTILINE)
    for entry in listed:
        matches = [p for p in (ROOT / (entry + ext) for ext in (".md", ".ipynb")) if p.exists()]
        assert len(matches) == 1, (
            f"_toc.yml lists {entry}, which should be exactly one .md or .ipynb"
        )
    notebooks = {f"book/{p.stem}" for p in (ROOT / "book").glob("*.ipynb")}
    assert notebooks <= set(listed), (
        f"notebooks missing from _toc.yml: {sorted(notebooks - set(listed))}"
    )
