"""Where the notebook helpers' output goes: IPython's display in Jupyter, print elsewhere.

In a Jupyter kernel an output shown with a display id can be rewritten later (the provenance
line is); in plain Python, and wherever IPython is not loaded, outputs are printed once.
"""

from __future__ import annotations

import os
import sys
from typing import Any


def ipython() -> Any:
    """The running IPython shell, or None in plain Python (or when IPython is not installed)."""
    if "IPython" not in sys.modules:
        return None
    from IPython import get_ipython

    return get_ipython()


def in_live_kernel() -> bool:
    """True in a Jupyter kernel that a person is watching: not plain Python, not nbmake.

    nbmake runs notebooks inside pytest, whose ``PYTEST_CURRENT_TEST`` variable the kernel
    inherits; there nobody watches, so plots are drawn once at the end.
    """
    shell = ipython()
    watched = "PYTEST_CURRENT_TEST" not in os.environ
    return shell is not None and hasattr(shell, "kernel") and watched


def show(obj: Any, display_id: str | None = None, update: bool = False) -> None:
    """IPython's display of `obj` (or, with `update`, a rewrite of the output `display_id`);
    a print of its repr in plain Python, where there is nothing to rewrite."""
    if ipython() is None:
        if not update:
            print(repr(obj))
        return
    from IPython.display import display, update_display

    if update and display_id is not None:
        update_display(obj, display_id=display_id)
    else:
        display(obj, display_id=display_id)


class MarkdownLine:
    """One line of text that renders as Markdown in Jupyter and as itself elsewhere."""

    def __init__(self, text: str, markdown: str):
        self.text, self.markdown = text, markdown

    def __repr__(self) -> str:
        return self.text

    def _repr_markdown_(self) -> str:
        return self.markdown
