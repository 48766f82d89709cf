"""pytest settings for the book's notebooks (``pytest --nbmake book/``).

Notebooks under test run at the ``smoke`` level unless ``SHAQ_RUN`` is already set: the kernel
that nbmake starts inherits this process's environment, and ``shaq.notebook.setup`` reads it.
To regenerate the committed outputs at the demo level instead:

    SHAQ_RUN=demo python -m pytest --nbmake --overwrite book/
"""

import os

os.environ.setdefault("SHAQ_RUN", "smoke")
