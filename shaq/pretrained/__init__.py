"""Weights that ship with shaq, trained here by shaq's own trainer (the way torchvision ships its
weights), with a manifest that says exactly how each was made.

    import shaq.pretrained
    shaq.pretrained.names()                     # ['lstm-cpu-standin', 'sharnn-cpu-standin', ...]
    model = shaq.pretrained.load("shaq-cpu-standin")       # in eval mode, float32
    shaq.pretrained.manifest("shaq-cpu-standin")["valid_bpb"]

From the command line, `pretrained:NAME` stands wherever a checkpoint does:
`python -m shaq eval pretrained:shaq-cpu-standin`, `python -m shaq generate pretrained:... `.

Each model is two files in this folder: NAME.pt, a state dict that `torch.load(...,
weights_only=True)` reads (no pickled code), and NAME.json, its manifest: the exact command, the
commit, the data and machine, the training figures, the bpb of the shipped weights on the whole
validation and test splits, the validation curve, the sha256 that `load` checks, and a figure on
a fixed slice of the validation split that tests re-measure. `tools/scoreboard.py` trains all of
them, one after another, and writes both files. `RECIPES` is what it trains.
"""

import hashlib
import io
import json
from importlib import resources

import torch
from torch import nn

from shaq.models import build_model, config_from_dict

# name -> the model and the options of `python -m shaq train` beyond the shared ones
# (--preset cpu --data standin --minutes M --seed S). All at the cpu preset: one shape per model
# family, tuned on SHAQ.
RECIPES: dict[str, list[str]] = {
    "lstm-cpu-standin": ["--model", "lstm"],
    "sharnn-cpu-standin": ["--model", "sharnn"],
    # The paper's own ablation (its Table 1, "no attention"): the same blocks without the head.
    "sharnn-noattn-cpu-standin": ["--model", "sharnn", "--attention-layers", ""],
    "shaq-cpu-standin": ["--model", "shaq"],
    "shaq-w2-cpu-standin": ["--model", "shaq", "--qrnn-window", "2"],
    "shatter-cpu-standin": ["--model", "shatter"],
}


class PretrainedError(ValueError):
    """An unknown name, or shipped files that are missing or damaged; the message says which."""


def _file(name: str, suffix: str):
    return resources.files(__name__).joinpath(name + suffix)


def names() -> list[str]:
    """The models whose weights ship with this copy of shaq, in RECIPES order."""
    return [name for name in RECIPES if _file(name, ".json").is_file()]


def manifest(name: str) -> dict:
    """Everything recorded about how `name` was trained and what it scores (see the module doc)."""
    if name not in names():
        known = ", ".join(names()) or "none (this copy of shaq ships no weights)"
        raise PretrainedError(f"no shipped model is called {name!r}; there are: {known}")
    return json.loads(_file(name, ".json").read_text())


def checkpoint(name: str) -> dict:
    """The shipped model `name` as a minimal checkpoint dict (model_name, model_config,
    train_config, step, and its float32 weights under "model"), so that whatever reads a
    checkpoint's configs reads these too. The weights' sha256 is checked first."""
    record = manifest(name)
    file = _file(name, ".pt")
    if not file.is_file():
        raise PretrainedError(f"{name}: its weights {file.name} are missing; reinstall shaq")
    data = file.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != record["weights"]["sha256"]:
        raise PretrainedError(
            f"{name}: {file.name} is damaged (sha256 {digest[:12]}..., the manifest says "
            f"{record['weights']['sha256'][:12]}...); reinstall shaq or restore the file"
        )
    weights = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    return {
        "model_name": record["model"],
        "model_config": record["model_config"],
        "train_config": record["train_config"],
        "step": record["tested_step"],
        "model": {key: tensor.float() for key, tensor in weights.items()},
    }


def load(name: str, device: torch.device | str = "cpu") -> nn.Module:
    """The shipped model `name`, float32, in eval mode, on `device`."""
    saved = checkpoint(name)
    name = saved["model_name"]
    model = build_model(name, config_from_dict(name, saved["model_config"]))
    model.load_state_dict(saved["model"])
    return model.to(device).eval()
