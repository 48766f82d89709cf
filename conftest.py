"""pytest configuration for the whole repository.

Notebooks run under pytest (`pytest --nbmake book/`) at the `smoke` run level unless
SHAQ_RUN says otherwise: nbmake's kernels inherit this process's environment.
"""

import os

os.environ.setdefault("SHAQ_RUN", "smoke")
