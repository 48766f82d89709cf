"""shaq: SHA-RNN and SHAQ byte-level language models on enwik8, in plain PyTorch.

`import shaq` makes the main modules available (`shaq.data`, `shaq.nn`, `shaq.optim`,
`shaq.models`), `shaq.generate(model, prompt, n, ...)`, the function, and `shaq.compress(model,
data)` / `shaq.decompress(model, blob)`, lossless compression with a model. The trainer, the
benchmark and the notebook helpers are imported on demand: `shaq.train`, `shaq.bench`,
`shaq.notebook`.
"""

__version__ = "0.1.0"

from shaq import data, models, nn, optim  # noqa: E402
from shaq.codec import compress, decompress  # noqa: E402
from shaq.generate import generate  # noqa: E402  (the function; the module stays in sys.modules)

__all__ = ["compress", "data", "decompress", "generate", "models", "nn", "optim", "__version__"]
