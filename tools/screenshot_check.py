#!/usr/bin/env python3
"""Render a page of the built book in headless Chromium and fail if a reader would see nothing.

    python3 tools/screenshot_check.py [PAGE ...] [--html _build/html] [--out _build/screenshots]

PAGE is a path under the built site (default: every chapter notebook listed in _toc.yml, e.g.
``book/02_enwik8_bits_per_byte.html``). For each page it

1. takes a screenshot of the top of the page (``chromium --headless --screenshot``) and fails
   if it is blank: almost no non-white pixels in the text column (a page of prose inks 1-2% of
   them, a page with code and figures 5-15%, a blank page 0%);
2. loads the page's final DOM (``--dump-dom``, after scripts ran) and fails if equations were
   not typeset by MathJax or widget views were not drawn by the widget renderer, both of which
   the site serves itself (no network is needed or used);
3. for every SVG diagram the page shows (``<img src="....svg">``, the chapters' drawn figures),
   fails if the file is missing, if Chromium cannot decode it as an image (its ``naturalWidth``
   is 0 or it fires ``onerror``), or if it renders blank.

Chromium comes from Debian: ``apt-get install -y chromium``. Exits 0 if every page looks right,
1 if one does not, 2 if Chromium or the site is missing. The PNGs are kept in --out to look at.
"""

from __future__ import annotations

import argparse
import re
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
MIN_INK = (
    0.008  # least fraction of non-white pixels in the text column of a page that shows something
)
MIN_DIAGRAM_INK = 0.01  # least fraction of non-white pixels of a diagram rendered on its own


def find_browser() -> str | None:
    for name in BROWSERS:
        if path := shutil.which(name):
            return path
    return None


def chromium(browser: str, *args: str, timeout: float = 90) -> subprocess.CompletedProcess:
    command = [
        browser,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--hide-scrollbars",
        "--no-first-run",
        "--disable-dev-shm-usage",
        "--virtual-time-budget=8000",
        *args,
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout)


# ----------------------------------------------------------------------------- PNG pixels


def read_png(path: Path) -> tuple[int, int, int, bytes]:
    """(width, height, channels, raw pixel rows) of an 8-bit RGB/RGBA/grey PNG, without PIL.

    Chromium writes plain 8-bit non-interlaced PNGs; each row is un-filtered here as the PNG
    specification describes (filters 0-4).
    """
    data = path.read_bytes()
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError(f"{path} is not a PNG")
    pos, idat, header = 8, [], None
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat.append(body)
        pos += 12 + length
    width, height, depth, color, _, _, interlace = header
    channels = {0: 1, 2: 3, 4: 2, 6: 4}.get(color)
    if depth != 8 or channels is None or interlace:
        raise ValueError(
            f"{path}: unsupported PNG (depth {depth}, colour type {color}, interlace {interlace})"
        )
    raw = zlib.decompress(b"".join(idat))
    stride = width * channels
    out = bytearray(stride * height)
    previous = bytearray(stride)
    for y in range(height):
        kind = raw[y * (stride + 1)]
        row = bytearray(raw[y * (stride + 1) + 1 : (y + 1) * (stride + 1)])
        for i in range(stride):
            left = row[i - channels] if i >= channels else 0
            up = previous[i]
            if kind == 1:
                row[i] = (row[i] + left) & 0xFF
            elif kind == 2:
                row[i] = (row[i] + up) & 0xFF
            elif kind == 3:
                row[i] = (row[i] + (left + up) // 2) & 0xFF
            elif kind == 4:
                up_left = previous[i - channels] if i >= channels else 0
                p = left + up - up_left
                pa, pb, pc = abs(p - left), abs(p - up), abs(p - up_left)
                row[i] = (
                    row[i] + (left if pa <= pb and pa <= pc else up if pb <= pc else up_left)
                ) & 0xFF
        out[y * stride : (y + 1) * stride] = row
        previous = row
    return width, height, channels, bytes(out)


def ink_fractions(path: Path) -> tuple[float, float]:
    """Fraction of non-white pixels over the whole image and over its middle half (the text)."""
    try:
        from PIL import Image
    except ImportError:
        width, height, channels, pixels = read_png(path)

        def ink(x0: int, x1: int) -> float:
            dark = total = 0
            for y in range(0, height, 2):  # every other row: plenty for a blank test
                base = y * width * channels
                for x in range(x0, x1, 2):
                    px = pixels[base + x * channels : base + x * channels + min(channels, 3)]
                    total += 1
                    dark += min(px) < 235
            return dark / max(total, 1)

        return ink(0, width), ink(width // 4, 3 * width // 4)
    with Image.open(path) as image:
        grey = image.convert("L")
        width, height = grey.size

        def ink(box) -> float:
            histogram = grey.crop(box).histogram()
            return sum(histogram[:235]) / max(sum(histogram), 1)

        return ink((0, 0, width, height)), ink((width // 4, 0, 3 * width // 4, height))


# ----------------------------------------------------------------------------- checks


def chapter_pages(root: Path) -> list[str]:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from check_site import source_of, toc_files

    return [
        f"{name}.html"
        for name in toc_files(root / "_toc.yml")
        if (source := source_of(root, name)) is not None and source.suffix == ".ipynb"
    ]


def check(
    browser: str, html_root: Path, page: str, out_dir: Path, width: int, height: int
) -> list[str]:
    path = (html_root / page).resolve()
    if not path.is_file():
        return [f"{page}: not in the built site"]
    shot = out_dir / (page.replace("/", "__").removesuffix(".html") + ".png")
    shot.parent.mkdir(parents=True, exist_ok=True)
    shot.unlink(missing_ok=True)
    url = path.as_uri()
    result = chromium(browser, f"--window-size={width},{height}", f"--screenshot={shot}", url)
    if not shot.is_file():
        return [
            f"{page}: Chromium wrote no screenshot (exit {result.returncode}): "
            f"{result.stderr.strip()[-300:]}"
        ]
    problems = []
    overall, column = ink_fractions(shot)
    if column < MIN_INK:
        problems.append(
            f"{page}: the page looks blank ({overall:.1%} of pixels drawn, "
            f"{column:.1%} in the text column); see {shot}"
        )

    source = path.read_text(encoding="utf-8")
    dom = chromium(browser, "--dump-dom", url).stdout
    if not dom.strip():
        problems.append(f"{page}: Chromium returned no DOM")
        return problems
    has_math = 'class="math' in source
    if has_math and "<mjx-container" not in dom:
        problems.append(f"{page}: has equations but MathJax typeset none of them")
    views = source.count("application/vnd.jupyter.widget-view+json")
    drawn = len(re.findall(r'class="[^"]*\bjupyter-widgets\b', dom))
    if views and drawn < views:
        problems.append(f"{page}: {views} widget view(s) but only {drawn} drawn: blank widgets")
    shown = []
    for src in dict.fromkeys(re.findall(r'<img[^>]+src="([^"]+\.svg)"', source)):
        found, problem = check_diagram(browser, path.parent / src, shot.with_suffix(""))
        problems += [f"{page}: {problem}"] if problem else []
        shown += [found] if found else []
    print(
        f"  {page}: {overall:.1%} of pixels drawn ({column:.1%} in the text column), "
        f"math {'typeset' if has_math else 'none'}, {views} widget view(s), "
        f"{len(shown)} diagram(s){': ' + ', '.join(shown) if shown else ''}, screenshot {shot}"
    )
    return problems


def check_diagram(browser: str, svg: Path, out_stem: Path) -> tuple[str | None, str | None]:
    """(what was seen, None) for an SVG that decodes and shows ink, else (None, the problem)."""
    svg = svg.resolve()
    if not svg.is_file():
        return None, f"diagram {svg.name} is not in the built site"
    # Decoded as an <img>, as the page shows it: the browser reports its natural width, or error.
    probe = out_stem.parent / f"{out_stem.name}__{svg.stem}.html"
    probe.write_text(
        f'<body><img src="{svg.as_uri()}" onload="document.body.dataset.loaded = this.naturalWidth"'
        " onerror=\"document.body.dataset.loaded = 'error'\"></body>",
        encoding="utf-8",
    )
    dom = chromium(browser, "--dump-dom", probe.as_uri()).stdout
    loaded = re.search(r'data-loaded="([^"]*)"', dom)
    if loaded is None or not loaded[1].isdigit() or int(loaded[1]) == 0:
        state = loaded[1] if loaded else "no load event"
        return None, f"diagram {svg.name} does not decode as an image ({state})"
    # Rendered on its own: a diagram that decodes but draws nothing is as bad as a missing one.
    shot = probe.with_suffix(".png")
    shot.unlink(missing_ok=True)
    chromium(browser, "--window-size=1000,800", f"--screenshot={shot}", svg.as_uri())
    if not shot.is_file():
        return None, f"diagram {svg.name}: Chromium wrote no screenshot"
    overall, _ = ink_fractions(shot)
    if overall < MIN_DIAGRAM_INK:
        return None, f"diagram {svg.name} renders blank ({overall:.1%} of pixels drawn); see {shot}"
    return f"{svg.name} ({loaded[1]} px wide, {overall:.1%} drawn)", None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "pages", nargs="*", help="pages under the site, e.g. book/02_enwik8_bits_per_byte.html"
    )
    parser.add_argument("--root", type=Path, default=ROOT, help="the book's root (holds _toc.yml)")
    parser.add_argument(
        "--html", type=Path, default=None, help="built site (default ROOT/_build/html)"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="where to keep the PNGs (default ROOT/_build/screenshots)",
    )
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=1600)
    args = parser.parse_args(argv)
    html_root = (args.html or args.root / "_build" / "html").resolve()
    out_dir = (args.out or args.root / "_build" / "screenshots").resolve()
    browser = find_browser()
    if browser is None:
        print(
            "screenshot_check: no Chromium found; install it with: apt-get install -y chromium",
            file=sys.stderr,
        )
        return 2
    if not html_root.is_dir():
        print(
            f"screenshot_check: {html_root} does not exist; build first: jupyter-book build .",
            file=sys.stderr,
        )
        return 2
    pages = args.pages or chapter_pages(args.root)
    if not pages:
        print("screenshot_check: no pages to check", file=sys.stderr)
        return 2
    print(f"screenshot_check: {len(pages)} page(s) with {Path(browser).name}")
    problems = []
    for page in pages:
        try:
            problems += check(browser, html_root, page, out_dir, args.width, args.height)
        except subprocess.TimeoutExpired:
            problems.append(f"{page}: Chromium did not finish within its time limit")
    if problems:
        print(f"screenshot_check: {len(problems)} problem(s):")
        for problem in problems:
            print(f"  - {problem}")
        return 1
    print("screenshot_check: OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
