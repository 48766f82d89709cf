"""The parser of `python -m shaq` (see `shaq.__main__`): one subcommand per command, and
`train`'s options made from the fields of the model configs and of TrainConfig.
"""

import argparse
import types
import typing
from dataclasses import fields

from shaq.evaluate import DynamicEval
from shaq.models import MODELS, model_class
from shaq.train_config import TrainConfig

PRESETS = ("smoke", "cpu", "paper")


class _Parser(argparse.ArgumentParser):
    """argparse, but a mistake is one line on stderr (no usage dump) and exit status 2."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# ------------------------------------------------------------------------- options from dataclasses


def _value_parser(kind: type, optional: bool) -> typing.Callable[[str], object]:
    """Parse one option value of a config field's type; 'none' gives None where the field
    allows it."""

    def parse(text: str):
        if optional and text.lower() in ("none", "null"):
            return None
        if kind is tuple:  # attention_layers: "0,2"; an empty string is the empty tuple
            return tuple(int(part) for part in text.split(",") if part.strip())
        return kind(text)

    parse.__name__ = kind.__name__  # argparse names it in "invalid int value: 'x'"
    return parse


def _field_type(hint) -> tuple[type, bool]:
    """(base type, whether None is allowed) of a dataclass field annotation like `int | None`."""
    args = typing.get_args(hint)
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        base = [a for a in args if a is not type(None)][0]
        return typing.get_origin(base) or base, type(None) in args
    return typing.get_origin(hint) or hint, False


def _preset_values(cls: type, name: str) -> str:
    """The field's value in each preset of `cls`, for --help: "64 / 256 / 1024" (smoke / cpu /
    paper)."""
    values = []
    for preset in PRESETS:
        value = getattr(cls.preset(preset), name)
        values.append(",".join(map(str, value)) if isinstance(value, tuple) else str(value))
    return values[0] if len(set(values)) == 1 else " / ".join(values)


def option_flag(name: str) -> str:
    """The option of a config field: --d-model for d_model."""
    return f"--{name.replace('_', '-')}"


def _add_config_options(
    parser: argparse.ArgumentParser,
    owners: dict[str, type],
    title: str,
    aliases: dict,
    models: dict[str, list[str]] | None = None,
) -> None:
    """One option per field name of `owners`, e.g. --d-model for d_model, typed and shown in --help
    as its owner class has it; absent from the namespace when not given. `models`: the models
    whose config has the field, named in --help where not every model's does."""
    group = parser.add_argument_group(title, "(value in the smoke / cpu / paper presets)")
    for name, cls in owners.items():
        kind, optional = _field_type(typing.get_type_hints(cls)[name])
        flags = [option_flag(name)] + aliases.get(name, [])
        shown = _preset_values(cls, name)
        if models is not None and len(models[name]) < len(MODELS):
            shown += f" (only {', '.join(models[name])})"
        if kind is bool:
            group.add_argument(
                *flags,
                dest=name,
                action=argparse.BooleanOptionalAction,
                default=argparse.SUPPRESS,
                help=shown,
            )
        else:
            metavar = "I,J,..." if kind is tuple else kind.__name__.upper()
            group.add_argument(
                *flags,
                dest=name,
                type=_value_parser(kind, optional),
                default=argparse.SUPPRESS,
                metavar=metavar,
                help=f"{shown}{'; none allowed' if optional else ''}",
            )


CHECKPOINT_HELP = "a .pt file, a run folder (its best.pt), or pretrained:NAME (shaq.pretrained)"

# `rnn` is no option: --model picks the model and with it the recurrent layer.
NOT_OPTIONS = ("rnn",)


def _models_with_field() -> dict[str, list[str]]:
    """Each field of the models' configs (but NOT_OPTIONS) with the models whose config has it: the
    model options, one per field name (a field that several configs have means the same in each)."""
    models: dict[str, list[str]] = {}
    for name, model in MODELS.items():
        for f in fields(model.config_class):
            if f.name not in NOT_OPTIONS:
                models.setdefault(f.name, []).append(name)
    return models


MODEL_OPTIONS = _models_with_field()
TRAIN_FIELDS = [f.name for f in fields(TrainConfig)]
# One option namespace for all configs: a field of a model's config and of TrainConfig would be
# ambiguous.
assert not set(MODEL_OPTIONS) & set(TRAIN_FIELDS)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="python -m shaq",
        description="SHA-RNN and SHAQ byte-level language models on enwik8.",
        allow_abbrev=False,
    )
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    train = commands.add_parser(
        "train",
        allow_abbrev=False,
        help="train a model (writes a run folder)",
        description=(
            "Train SHA-RNN ('sharnn'), SHAQ ('shaq'), an LSTM baseline ('lstm') or Shatter "
            "('shatter'). The preset sets both the model shape and the training settings; every "
            "field below overrides one. Data: 'enwik8' (the paper preset) insists on enwik8 from "
            "--data-root, downloading it if needed, and stops before any work without it; 'auto' "
            "(the cpu preset) falls back to the offline stand-in with a notice; 'standin' (the "
            "smoke preset) is the offline corpus built from Python's own docs and sources. "
            "--init-from starts a new run from another run's weights (fresh optimizer and "
            "schedule; the model and settings of that run, with any option overriding): the "
            "reference's second pass is --init-from RUN/best.pt --lr 1e-3 --epochs 5 --seed 125."
        ),
    )
    train.add_argument(
        "--preset",
        choices=PRESETS,
        default=None,
        help="smoke (seconds), cpu (10 minutes on a CPU, the default) or paper (the reference)",
    )
    train.add_argument(
        "--resume",
        metavar="DIR",
        default=None,
        help=(
            "continue the run in DIR from its last.pt (only --steps, --minutes and such may change)"
        ),
    )
    owners = {name: model_class(models[0]).config_class for name, models in MODEL_OPTIONS.items()}
    configs = ", ".join(dict.fromkeys(cls.__name__ for cls in owners.values()))
    _add_config_options(
        train,
        owners,
        f"model ({configs}: the fields of --model's config)",
        {},
        models=MODEL_OPTIONS,
    )
    train.add_argument("--rnn", default=None, help=argparse.SUPPRESS)  # to say what to do instead
    _add_config_options(
        train,
        dict.fromkeys(TRAIN_FIELDS, TrainConfig),
        "training (TrainConfig)",
        {"out_dir": ["--out"]},
    )
    train.add_argument("--quiet", action="store_true", help="no progress bar or summary")

    ev = commands.add_parser(
        "eval", allow_abbrev=False, help="bits per byte of a checkpoint on valid or test"
    )
    ev.add_argument("checkpoint", help=CHECKPOINT_HELP)
    ev.add_argument("--split", choices=("valid", "test"), default="test")
    ev.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="rows (default: the run's eval_batch_size for valid, test_batch_size for test)",
    )
    ev.add_argument(
        "--bytes", type=int, default=None, help="evaluate on this prefix of the split only"
    )
    ev.add_argument(
        "--data-root", default=None, help="where enwik8 is (default: the run's data_root)"
    )
    ev.add_argument("--device", default="auto")
    ev.add_argument(
        "--dynamic",
        action="store_true",
        help="dynamic evaluation (Krause et al., 2018): the model learns from each segment after "
        "scoring it; reported apart from the static figure",
    )
    ev.add_argument(
        "--dynamic-lr",
        type=float,
        default=DynamicEval.lr,
        help=f"Adam's step size for --dynamic (default {DynamicEval.lr:g})",
    )
    ev.add_argument(
        "--dynamic-decay",
        type=float,
        default=DynamicEval.decay,
        help="for --dynamic: per step, move the weights this fraction back to the trained ones "
        f"(default {DynamicEval.decay:g})",
    )

    comp = commands.add_parser(
        "compress",
        allow_abbrev=False,
        help="compress a file losslessly with a model",
        description=(
            "Code every byte of IN with the model's prediction of it (an arithmetic coder): OUT is "
            "about the model's cross-entropy on IN. `decompress` with the same checkpoint gives IN "
            "back, on the same kind of machine with the same versions (OUT records them, and "
            "decompress refuses otherwise)."
        ),
    )
    comp.add_argument("checkpoint", help=CHECKPOINT_HELP)
    comp.add_argument("input", metavar="IN", help="the file to compress")
    comp.add_argument("output", metavar="OUT", help="where to write the compressed file")
    comp.add_argument(
        "--lanes",
        type=int,
        default=None,
        help="pieces of IN coded side by side: faster, a little larger (default: up to 16)",
    )
    comp.add_argument(
        "--device", default="cpu", help="decompress must run on the same kind (default cpu)"
    )
    comp.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1); recorded in OUT, and decompress uses the same",
    )
    comp.add_argument("--quiet", action="store_true", help="no progress bar or summary")

    dec = commands.add_parser(
        "decompress",
        allow_abbrev=False,
        help="restore a file that `compress` wrote",
        description="Write to OUT the bytes that `compress` coded into IN with this checkpoint.",
    )
    dec.add_argument(
        "checkpoint", help="the checkpoint that compressed IN (" + CHECKPOINT_HELP + ")"
    )
    dec.add_argument("input", metavar="IN", help="a file written by `python -m shaq compress`")
    dec.add_argument("output", metavar="OUT", help="where to write the restored bytes")
    dec.add_argument(
        "--device", default="cpu", help="the kind of device IN was compressed on (default cpu)"
    )
    dec.add_argument("--quiet", action="store_true", help="no progress bar")

    gen = commands.add_parser(
        "generate", allow_abbrev=False, help="continue a prompt; the bytes go to stdout"
    )
    gen.add_argument("checkpoint", help=CHECKPOINT_HELP)
    gen.add_argument("--prompt", required=True, help="text to continue (UTF-8)")
    gen.add_argument("-n", type=int, default=200, help="bytes to generate (default 200)")
    gen.add_argument(
        "--temperature", type=float, default=1.0, help="0 = always the most likely byte"
    )
    gen.add_argument(
        "--top-p", type=float, default=None, help="nucleus sampling threshold (the reference: 0.98)"
    )
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--device", default="auto")
    return parser


def _dashes(arg: str) -> str:
    """--d_model -> --d-model (and --d_model=3 -> --d-model=3): field names work with either."""
    if not arg.startswith("--"):
        return arg
    name, sep, value = arg.partition("=")
    return name.replace("_", "-") + sep + value


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The command line `argv` parsed; `command` names the command. A mistake exits with
    status 2."""
    return build_parser().parse_args([_dashes(arg) for arg in argv])
