"""A small table of numbers and words: Markdown in Jupyter (and the book), plain text elsewhere.

The chapters end a cell with a `Table`, which Jupyter shows as Markdown; the benchmark prints
``Table(...).text()``, and the GPU check ``Table(...).markdown()``, to paste into the README. All
round and separate thousands in the same way::

    Table(["model", "bpb"], [["unigram", 4.93], ["bigram", 3.41]], digits=3)
"""

from __future__ import annotations

import re
from typing import Any

# A cell that reads as a number: 12,345 / -0.5 / 3.1e-07 / 42% / nan / n/a (a missing number).
_NUMBER = re.compile(r"[-+]?(\d[\d,]*(\.\d*)?|\.\d+)(e[-+]?\d+)?%?|[-+]?(nan|inf)|n/a")


def format_value(value: Any, digits: int | None = 3) -> str:
    """One cell as people read it.

    Ints get thousands separators (``12,345``); floats get `digits` decimals, or with
    ``digits=None`` as many as their size needs (``12,345`` / ``1.23`` / ``0.0123``); None is
    ``n/a``; anything else is shown with ``str``.
    """
    if value is None:
        return "n/a"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if digits is not None:
        return f"{value:,.{digits}f}"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.2f}" if abs(value) >= 1 else f"{value:.3g}"


class Table:
    """A table of `headers` and `rows`, each row a list of one value per header.

    As the last expression of a Jupyter cell it shows itself as Markdown; `text` (also its
    ``repr``) lines it up for a terminal: a column whose cells all read as numbers (``12,345``,
    ``0.5``, ``42%``, ``n/a``) to the right, any other to the left.
    """

    def __init__(self, headers: list[str], rows: list[list[Any]], digits: int | None = 3):
        self.headers = [str(h) for h in headers]
        if any(len(row) != len(self.headers) for row in rows):
            raise ValueError(f"every row needs {len(self.headers)} values, like the headers")
        self.rows = [[format_value(value, digits) for value in row] for row in rows]
        self.numeric = [
            bool(self.rows) and all(_NUMBER.fullmatch(row[i]) for row in self.rows)
            for i in range(len(self.headers))
        ]

    def text(self) -> str:
        """The table as aligned plain text, a line of dashes under the headers."""
        widths = [
            max(len(cell) for cell in column)
            for column in zip(self.headers, *self.rows, strict=True)
        ]
        lines = [self.headers, ["-" * w for w in widths], *self.rows]
        return "\n".join(
            "  ".join(
                cell.rjust(w) if numeric else cell.ljust(w)
                for cell, w, numeric in zip(line, widths, self.numeric, strict=True)
            ).rstrip()
            for line in lines
        )

    def markdown(self) -> str:
        """The table in Markdown (a ``|`` inside a cell is escaped)."""

        def line(cells: list[str]) -> str:
            return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

        rule = "|" + "|".join("---" for _ in self.headers) + "|"
        return "\n".join([line(self.headers), rule, *(line(row) for row in self.rows)])

    def __repr__(self) -> str:
        return self.text()

    def _repr_markdown_(self) -> str:
        return self.markdown()
