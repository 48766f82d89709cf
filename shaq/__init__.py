"""shaq: SHA-RNN and SHAQ byte-level language models on enwik8, in plain PyTorch."""

__version__ = "0.1.0"
