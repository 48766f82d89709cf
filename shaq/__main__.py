"""The command line: `python -m shaq train | eval | generate`.

    python -m shaq train --model shaq --preset cpu              # ten minutes on a CPU
    python -m shaq train --preset smoke --data standin --steps 50 --out runs/try
    python -m shaq train --resume runs/try --steps 100          # continue a run exactly
    python -m shaq train --init-from runs/try/best.pt --lr 1e-3 --epochs 5 --seed 125   # a second pass
    python -m shaq eval runs/try --split test
    python -m shaq generate runs/try --prompt "The " -n 200

`train` takes every field of SHARNNConfig (model shape) and TrainConfig (training) as an option,
e.g. `--d-model 512 --attention-layers 0,2 --lr 1e-3 --no-variable-seq-len`; a field left out
keeps the preset's value. Mistakes (an unknown option, an impossible value, data that cannot be
had, a run folder that another process is writing, a damaged checkpoint) stop before any work
with a one-line message and exit status 2. A run that fails (a non-finite loss, a checkpoint
that cannot be written) exits with 1; Ctrl-C or SIGTERM stops it after the step in progress
with last.pt saved and exits with 130 or 143 (128 + the signal).
"""

import argparse
import sys
import types
import typing
from dataclasses import fields

import torch.distributed as dist

from shaq.checkpoint import CheckpointError, load_model
from shaq.data import DataError
from shaq.device import autocast_dtype, pick_device
from shaq.generate import generate
from shaq.models import SHARNNConfig
from shaq.runlock import RunLockError
from shaq.train import (
    NonFiniteError, TrainConfig, Trainer, TrainingError, TrainingInterrupted, evaluate, load_corpus,
)

PRESETS = ("smoke", "cpu", "paper")


class _Parser(argparse.ArgumentParser):
    """argparse, but a mistake is one line on stderr (no usage dump) and exit status 2."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _fail(message: str) -> typing.NoReturn:
    print(f"shaq: error: {message}", file=sys.stderr)
    raise SystemExit(2)


# ----------------------------------------------------------------------------- options from dataclasses


def _value_parser(kind: type, optional: bool) -> typing.Callable[[str], object]:
    """Parse one option value of a config field's type; 'none' gives None where the field allows it."""

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
    """The field's value in each preset, for --help: "64 / 256 / 1024" (smoke / cpu / paper)."""
    values = []
    for preset in PRESETS:
        value = getattr(cls.preset(preset), name)
        values.append(",".join(map(str, value)) if isinstance(value, tuple) else str(value))
    return values[0] if len(set(values)) == 1 else " / ".join(values)


def _add_config_options(parser: argparse.ArgumentParser, cls: type, title: str, aliases: dict,
                        skip: tuple[str, ...] = ()) -> None:
    """One option per field of `cls`, e.g. --d-model for d_model; absent from the namespace when not given."""
    group = parser.add_argument_group(title, "(value in the smoke / cpu / paper presets)")
    hints = typing.get_type_hints(cls)
    for f in (f for f in fields(cls) if f.name not in skip):
        kind, optional = _field_type(hints[f.name])
        flags = [f"--{f.name.replace('_', '-')}"] + aliases.get(f.name, [])
        shown = _preset_values(cls, f.name)
        if kind is bool:
            group.add_argument(*flags, dest=f.name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                               help=shown)
        else:
            metavar = "I,J,..." if kind is tuple else kind.__name__.upper()
            group.add_argument(*flags, dest=f.name, type=_value_parser(kind, optional), default=argparse.SUPPRESS,
                               metavar=metavar, help=f"{shown}{'; none allowed' if optional else ''}")


# `rnn` is no option: --model picks the model and with it the recurrent layer.
NOT_OPTIONS = ("rnn",)
MODEL_FIELDS = [f.name for f in fields(SHARNNConfig) if f.name not in NOT_OPTIONS]
TRAIN_FIELDS = [f.name for f in fields(TrainConfig)]
# One option namespace for both configs: a field name in both would be ambiguous.
assert not set(MODEL_FIELDS) & set(TRAIN_FIELDS)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m shaq", description="SHA-RNN and SHAQ byte-level language models on enwik8.",
                     allow_abbrev=False)
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    train = commands.add_parser(
        "train", allow_abbrev=False, help="train a model (writes a run folder)",
        description=(
            "Train SHA-RNN ('sharnn'), SHAQ ('shaq') or an LSTM baseline ('lstm'). The preset sets both "
            "the model shape and the training settings; every field below overrides one. Data: 'enwik8' "
            "(the paper preset) insists on enwik8 from --data-root, downloading it if needed, and stops "
            "before any work without it; 'auto' (the cpu preset) falls back to the offline stand-in with "
            "a notice; 'standin' (the smoke preset) is the offline corpus built from Python's own docs "
            "and sources. --init-from starts a new run from another run's weights (fresh optimizer and "
            "schedule; the model and settings of that run, with any option overriding): the "
            "reference's second pass is --init-from RUN/best.pt --lr 1e-3 --epochs 5 --seed 125."))
    train.add_argument("--preset", choices=PRESETS, default=None,
                       help="smoke (seconds), cpu (10 minutes on a CPU, the default) or paper (the reference)")
    train.add_argument("--resume", metavar="DIR", default=None,
                       help="continue the run in DIR from its last.pt (only --steps, --minutes and such may change)")
    _add_config_options(train, SHARNNConfig, "model (SHARNNConfig)", {}, skip=NOT_OPTIONS)
    train.add_argument("--rnn", default=None, help=argparse.SUPPRESS)  # to say what to do instead
    _add_config_options(train, TrainConfig, "training (TrainConfig)", {"out_dir": ["--out"]})
    train.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    train.set_defaults(handler=_train)

    ev = commands.add_parser("eval", allow_abbrev=False, help="bits per byte of a checkpoint on valid or test")
    ev.add_argument("checkpoint", help="a .pt file, or a run folder (its best.pt)")
    ev.add_argument("--split", choices=("valid", "test"), default="test")
    ev.add_argument("--batch-size", type=int, default=None,
                    help="rows (default: the run's eval_batch_size for valid, test_batch_size for test)")
    ev.add_argument("--bytes", type=int, default=None, help="evaluate on this prefix of the split only")
    ev.add_argument("--data-root", default=None, help="where enwik8 is (default: the run's data_root)")
    ev.add_argument("--device", default="auto")
    ev.set_defaults(handler=_eval)

    gen = commands.add_parser("generate", allow_abbrev=False, help="continue a prompt; the bytes go to stdout")
    gen.add_argument("checkpoint", help="a .pt file, or a run folder (its best.pt)")
    gen.add_argument("--prompt", required=True, help="text to continue (UTF-8)")
    gen.add_argument("-n", type=int, default=200, help="bytes to generate (default 200)")
    gen.add_argument("--temperature", type=float, default=1.0, help="0 = always the most likely byte")
    gen.add_argument("--top-p", type=float, default=None, help="nucleus sampling threshold (the reference: 0.98)")
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--device", default="auto")
    gen.set_defaults(handler=_generate)
    return parser


# ----------------------------------------------------------------------------- commands


def _train(args: argparse.Namespace) -> int:
    given = vars(args)
    if args.rnn is not None:
        _fail(f"--rnn {args.rnn} is not an option: --model picks the model and with it the recurrent layer "
              "(sharnn: LSTM, shaq: QRNN, lstm: LSTM); for QRNNs use --model shaq")
    model_overrides = {name: given[name] for name in MODEL_FIELDS if name in given}
    train_overrides = {name: given[name] for name in TRAIN_FIELDS if name in given}
    try:
        if args.resume is not None:
            if args.preset is not None:
                _fail("--resume continues a run with its saved settings; drop --preset")
            if "init_from" in train_overrides:
                _fail("--resume continues a run, --init-from starts a new one from a run's weights: choose one")
            trainer = Trainer.resume(args.resume, model_overrides=model_overrides, verbose=not args.quiet,
                                     **train_overrides)
        elif train_overrides.get("init_from") is not None:
            if args.preset is not None or model_overrides:
                _fail("--init-from takes the model and the training settings of the run it starts from; drop "
                      "--preset and the model options (training options such as --lr or --epochs override)")
            trainer = Trainer.start_from(train_overrides.pop("init_from"), verbose=not args.quiet, **train_overrides)
        else:
            preset = args.preset or "cpu"
            model_config = SHARNNConfig.preset(preset, **model_overrides)
            trainer = Trainer(TrainConfig.preset(preset, **train_overrides), model_config, verbose=not args.quiet)
    except (ValueError, DataError, CheckpointError, RunLockError) as err:
        _fail(str(err))
    try:
        trainer.fit()
    except TrainingInterrupted as err:
        print(f"shaq: {err}", file=sys.stderr)
        return 128 + err.signum  # the shell's convention for a process ended by a signal
    except (TrainingError, CheckpointError) as err:  # CheckpointError: a best.pt damaged since it was saved
        print(f"shaq: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # outside the training loop: during the final test, after last.pt was saved
        print(f"\ninterrupted at step {trainer.progress.step}; continue with: python -m shaq train --resume {trainer.run_dir}",
              file=sys.stderr)
        return 130
    return 0


def _eval(args: argparse.Namespace) -> int:
    try:
        device = pick_device(args.device)
        model, checkpoint = load_model(args.checkpoint, device)
        config = TrainConfig(**checkpoint["train_config"])
        corpus = load_corpus(config.data, args.data_root or config.data_root)
        batch_size = args.batch_size or (config.eval_batch_size if args.split == "valid" else config.test_batch_size)
        if batch_size < 1 or (args.bytes is not None and args.bytes < 2):
            _fail("--batch-size must be >= 1 and --bytes >= 2")
        split = getattr(corpus, args.split)
        bpb = evaluate(model, split, batch_size, config.seq_len, args.bytes, autocast_dtype(device, config.amp))
    except NonFiniteError as err:
        _fail(f"{args.checkpoint}: {err}")
    except (ValueError, DataError, CheckpointError) as err:
        _fail(str(err))
    n = split[: args.bytes].numel()
    print(f"{args.split} bpb {bpb:.4f} on {n:,} bytes of {corpus.name} (batch {batch_size}, bptt {config.seq_len}; "
          f"{checkpoint['model_name']} at step {checkpoint['step']:,})")
    return 0


def _generate(args: argparse.Namespace) -> int:
    try:
        model, _ = load_model(args.checkpoint, pick_device(args.device))
        out = generate(model, args.prompt.encode("utf-8"), args.n, temperature=args.temperature, top_p=args.top_p,
                       seed=args.seed)
    except (ValueError, CheckpointError) as err:
        _fail(str(err))
    sys.stdout.buffer.write(out)
    sys.stdout.buffer.flush()
    return 0


def _dashes(arg: str) -> str:
    """--d_model -> --d-model (and --d_model=3 -> --d-model=3): field names work with either."""
    if not arg.startswith("--"):
        return arg
    name, sep, value = arg.partition("=")
    return name.replace("_", "-") + sep + value


def main(argv: list[str] | None = None) -> int:
    """Run the command line `argv` (default sys.argv[1:]); returns the exit status."""
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args([_dashes(arg) for arg in argv])
    try:
        return args.handler(args)
    finally:
        if dist.is_initialized():  # joined by the Trainer under torchrun
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
