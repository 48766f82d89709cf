#!/usr/bin/env python3
"""Check the built book (``jupyter-book build .``, execution off) for what readers would see broken.

    python3 tools/check_site.py [--html _build/html] [--expect-level demo]

For every page in ``_toc.yml`` it checks that

- the HTML page exists;
- every ``<img>`` points to a file that exists, and a notebook page shows at least as many
  images under ``_images/`` as its notebook has image outputs;
- no output holds a traceback, an error or "Execution Failed", and Sphinx left no
  "System Message" (a docutils error) in the page;
- no widget is blank: every widget view has its state on the page, the widget scripts are the
  site's own files, and no output is the text fallback of a widget (``HBox(children=...``);
- no absolute path of the build machine (/work/, /root/, /tmp/, /home/...) is shown;
- each chapter notebook finished its run: its provenance line ("Produced by run level ...")
  is complete, and at the level given by ``--expect-level``;
- the outputs are current: the commit in each provenance line, and in each manifest of the
  shipped weights (shaq/pretrained/*.json), is clean, an ancestor of HEAD, and no older than the
  last change to the files that decide the numbers (``shaq.provenance.DECIDING_FILES``).

It also fails if Jupyter Book wrote execution error reports (``_build/html/reports``).
Exits 0 when everything holds, 1 with one line per problem otherwise (2 for bad usage).
Only the standard library, PyYAML (a Jupyter Book dependency) and shaq/provenance.py (loaded from
its file, without importing shaq) are used.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import sys
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlparse

ROOT = Path(__file__).resolve().parents[1]


def _load_provenance():
    spec = importlib.util.spec_from_file_location("provenance", ROOT / "shaq" / "provenance.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


provenance = _load_provenance()

LOCAL_PATHS = ("/work/", "/root/", "/tmp/", "/home/", "/Users/", "C:\\Users\\")
WIDGET_TEXT = re.compile(r"\b(HBox|VBox|IntProgress|FloatProgress|IntSlider|FloatSlider)\(")
ERROR_TEXT = re.compile(
    r"Traceback \(most recent call last\)|\b[A-Z][A-Za-z]*Error: |Execution Failed"
)
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
WIDGET_STATE = "application/vnd.jupyter.widget-state+json"


class Page(HTMLParser):
    """Collects what the checks need from one HTML page."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.images: list[str] = []
        self.scripts: list[tuple[str, str]] = []  # (src, type)
        self.widget_views: list[str] = []  # model ids
        self.widget_states: list[dict] = []
        self.output_texts: list[str] = []  # text inside cell outputs
        self.error_blocks = 0  # outputs rendered as tracebacks / errors
        self.stderr_texts: list[str] = []
        self.text_parts: list[str] = []
        self._script_type: str | None = None
        self._script_body: list[str] = []
        self._output_depth = 0  # >0 while inside a cell output
        self._stderr_depth = 0
        self._stack: list[tuple[bool, bool]] = []  # per open div: (opened output, opened stderr)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        classes = set((attrs.get("class") or "").split())
        if tag == "img":
            self.images.append(attrs.get("src") or "")
        if tag == "script":
            self._script_type = attrs.get("type") or ""
            self._script_body = []
            if attrs.get("src"):
                self.scripts.append((attrs["src"], self._script_type))
        if tag == "div":
            is_output = bool(classes & {"cell_output", "output"})
            is_stderr = "stderr" in classes
            if "traceback" in classes or (
                classes & {"output_error", "error"} and self._output_depth
            ):
                self.error_blocks += 1
            self._output_depth += is_output
            self._stderr_depth += is_stderr
            self._stack.append((is_output, is_stderr))

    def handle_endtag(self, tag):
        if tag == "script" and self._script_type is not None:
            body = "".join(self._script_body).strip()
            if self._script_type == WIDGET_VIEW and body:
                self.widget_views.append(json.loads(body).get("model_id", ""))
            elif self._script_type == WIDGET_STATE and body:
                self.widget_states.append(json.loads(body))
            self._script_type = None
        if tag == "div" and self._stack:
            was_output, was_stderr = self._stack.pop()
            self._output_depth -= was_output
            self._stderr_depth -= was_stderr

    def handle_data(self, data):
        if self._script_type is not None:
            self._script_body.append(data)
            return
        self.text_parts.append(data)
        if self._output_depth:
            self.output_texts.append(data)
        if self._stderr_depth:
            self.stderr_texts.append(data)


def toc_files(toc_path: Path) -> list[str]:
    """Every file named in _toc.yml (root first), without suffix, as written there."""
    import yaml

    toc = yaml.safe_load(toc_path.read_text())
    files = [toc["root"]]

    def walk(entries):
        for entry in entries or []:
            if "file" in entry:
                files.append(entry["file"])
            for key in ("chapters", "sections"):
                walk(entry.get(key))

    for part in toc.get("parts", []):
        walk(part.get("chapters"))
    walk(toc.get("chapters"))
    walk(toc.get("sections"))
    return files


def source_of(root: Path, name: str) -> Path | None:
    for suffix in (".ipynb", ".md", ".rst"):
        if (root / f"{name}{suffix}").exists():
            return root / f"{name}{suffix}"
    return None


def notebook_images(path: Path) -> int:
    """Image outputs of a notebook that the page should show (removed cells/outputs excluded)."""
    nb = json.loads(path.read_text())
    count = 0
    for cell in nb["cells"]:
        tags = set(cell.get("metadata", {}).get("tags", []))
        if cell["cell_type"] != "code" or tags & {"remove-cell", "remove-output"}:
            continue
        for output in cell.get("outputs", []):
            data = output.get("data", {})
            if any(key.startswith("image/") for key in data):
                count += 1
    return count


def check_page(
    html_root: Path,
    page_path: Path,
    source: Path | None,
    expect_level: str | None,
    root: Path = ROOT,
    stale_notes: list[str] | None = None,
) -> list[str]:
    name = page_path.relative_to(html_root).as_posix()
    parser = Page()
    parser.feed(page_path.read_text(encoding="utf-8"))
    problems = []

    # images
    shown = 0
    for src in parser.images:
        url = urlparse(src)
        if url.scheme in ("http", "https", "data"):
            continue
        target = (page_path.parent / unquote(url.path)).resolve()
        if not target.is_file():
            problems.append(f"{name}: image {src} does not exist")
        elif "_images" in target.parts:
            shown += 1
    if source is not None and source.suffix == ".ipynb":
        wanted = notebook_images(source)
        if shown < wanted:
            problems.append(
                f"{name}: shows {shown} figure(s) from _images/, its notebook has {wanted}"
            )

    # errors
    outputs = "".join(parser.output_texts)
    if parser.error_blocks:
        problems.append(f"{name}: {parser.error_blocks} output(s) rendered as a traceback or error")
    if match := ERROR_TEXT.search(outputs):
        problems.append(f"{name}: an output contains {match.group(0).strip()!r}")
    stderr = "".join(parser.stderr_texts)
    if re.search(r"Error|Traceback|Exception", stderr):
        problems.append(f"{name}: stderr output reports an error: {stderr.strip()[:120]!r}")
    text = "".join(parser.text_parts)
    if "System Message" in text:
        problems.append(f"{name}: Sphinx left a 'System Message' (a docutils error) in the page")
    if "Execution Failed" in text or "execution failed" in text:
        problems.append(f"{name}: says 'Execution Failed'")

    # widgets
    if match := WIDGET_TEXT.search(outputs):
        problems.append(
            f"{name}: an output shows a widget as text ({match.group(0)}...): a blank widget"
        )
    known = set()
    for state in parser.widget_states:
        known.update(state.get("state", {}))
    for model_id in parser.widget_views:
        if model_id not in known:
            problems.append(
                f"{name}: widget view {model_id or '(no id)'} has no saved state: it renders blank"
            )
    if parser.widget_views:
        for src, _ in parser.scripts:
            if "embed-amd" in src or "require" in src:
                if urlparse(src).scheme:
                    problems.append(f"{name}: widget script loaded from the network: {src}")
                elif not (page_path.parent / urlparse(src).path).resolve().is_file():
                    problems.append(f"{name}: widget script {src} is missing from the site")
        if not any("embed-amd" in src for src, _ in parser.scripts):
            problems.append(f"{name}: has widgets but no widget renderer script")

    # local paths
    page_text = page_path.read_text(encoding="utf-8")
    for local in LOCAL_PATHS:
        if local in page_text:
            where = page_text.index(local)
            problems.append(
                f"{name}: shows a local path: ...{page_text[max(0, where - 40) : where + 40]!r}..."
            )

    # provenance of chapter notebooks
    if source is not None and source.suffix == ".ipynb":
        lines = re.findall(r"Produced by run level \w+[^\n<]*", text)
        if not lines:
            problems.append(
                f"{name}: no provenance line ('Produced by run level ...'): was it run?"
            )
        for line in lines:
            if "still running" in line:
                problems.append(
                    f"{name}: the provenance line was never completed (the run stopped early)"
                )
        for revision in set(re.findall(r"shaq [\w.]+ \(([0-9a-f]+\+?)\)", " ".join(lines))):
            if why := provenance.stale(revision, root):
                where = problems if stale_notes is None else stale_notes
                where.append(f"{name}: outputs are not current: {why}")
        levels = set(re.findall(r"Produced by run level (\w+)", text))
        if expect_level and levels and levels != {expect_level}:
            problems.append(
                f"{name}: outputs come from run level {sorted(levels)}, expected {expect_level}"
            )
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=ROOT, help="the book's root (holds _toc.yml)")
    parser.add_argument(
        "--html", type=Path, default=None, help="built site (default ROOT/_build/html)"
    )
    parser.add_argument(
        "--expect-level",
        choices=["smoke", "demo", "full"],
        default=None,
        help="fail unless every chapter's outputs come from this run level",
    )
    parser.add_argument(
        "--stale-chapters",
        choices=["fail", "warn"],
        default="fail",
        help="whether chapter outputs older than the code that decides their numbers fail the "
        "check or are listed as warnings (shipped weights always fail)",
    )
    args = parser.parse_args(argv)
    html_root = (args.html or args.root / "_build" / "html").resolve()
    toc_path = args.root / "_toc.yml"
    if not toc_path.is_file():
        print(f"check_site: no _toc.yml in {args.root}", file=sys.stderr)
        return 2
    if not html_root.is_dir():
        print(
            f"check_site: {html_root} does not exist; build first: jupyter-book build .",
            file=sys.stderr,
        )
        return 2

    problems, warnings = [], []
    names = toc_files(toc_path)
    figures = 0
    for name in names:
        page = html_root / f"{name}.html"
        source = source_of(args.root, name)
        if source is None:
            problems.append(f"{name}: listed in _toc.yml but no .ipynb/.md/.rst source exists")
        if not page.is_file():
            problems.append(f"{name}: no page {page.relative_to(html_root)} in the built site")
            continue
        problems += check_page(
            html_root,
            page,
            source,
            args.expect_level,
            args.root,
            warnings if args.stale_chapters == "warn" else None,
        )
        if source is not None and source.suffix == ".ipynb":
            figures += notebook_images(source)
    for manifest in sorted((args.root / "shaq" / "pretrained").glob("*.json")):
        record = json.loads(manifest.read_text())
        if "commit" in record and (why := provenance.stale(record["commit"], args.root)):
            problems.append(f"shaq/pretrained/{manifest.name}: the weights are not current: {why}")
    reports = html_root / "reports"
    if reports.is_dir() and any(reports.iterdir()):
        problems.append(
            f"execution error reports exist in {reports.relative_to(html_root.parent.parent)}"
        )

    for warning in warnings:
        print(f"check_site: warning: {warning}")
    if problems:
        print(f"check_site: {len(problems)} problem(s) in {html_root}:")
        for problem in problems:
            print(f"  - {problem}")
        return 1
    print(
        f"check_site: OK: {len(names)} pages from _toc.yml, {figures} notebook figures, no errors, "
        "no blank widgets, no local paths"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
