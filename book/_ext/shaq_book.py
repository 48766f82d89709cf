"""Sphinx extension for the book: document the shaq of this checkout.

Jupyter Book 1 imports this module (``sphinx.local_extensions`` in ``_config.yml``) before
autodoc runs, so putting the repository root first on ``sys.path`` here makes the API reference
describe the code next to the book, even when another copy of shaq is installed.
"""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def setup(app):
    return {"parallel_read_safe": True, "parallel_write_safe": True}
