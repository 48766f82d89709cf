"""The command line: `python -m shaq train | eval | generate | compress | decompress`.

    python -m shaq train --model shaq --preset cpu              # ten minutes on a CPU
    python -m shaq train --preset smoke --data standin --steps 50 --out runs/try
    python -m shaq train --resume runs/try --steps 100          # continue a run exactly
    python -m shaq train --init-from runs/try/best.pt --lr 1e-3 --epochs 5 --seed 125  # second pass
    python -m shaq eval runs/try --split test                   # --dynamic: dynamic evaluation
    python -m shaq generate runs/try --prompt "The " -n 200
    python -m shaq compress runs/try notes.txt notes.shaqz      # an arithmetic coder driven by
                                                                # the model
    python -m shaq decompress runs/try notes.shaqz notes.txt

`train` takes every field of the model configs (SHARNNConfig, LSTMConfig, ShatterConfig: the model's
shape) and of TrainConfig (training) as an option, e.g. `--d-model 512 --attention-layers 0,2
--lr 1e-3 --no-variable-seq-len`; a field left out keeps the preset's value. Mistakes (an unknown
option, an option of another model than --model's, an impossible value, data that cannot be had, a
run folder that another process is writing, a damaged checkpoint) stop before any work with a
one-line message and exit status 2. A run that fails (a non-finite loss, a checkpoint that cannot be
written) exits with 1; Ctrl-C or SIGTERM stops it after the step in progress with last.pt saved and
exits with 130 or 143 (128 + the signal).
"""

import argparse
import sys
import types
import typing
from dataclasses import fields
from pathlib import Path

import torch
import torch.distributed as dist

import shaq.pretrained
from shaq.checkpoint import CheckpointError, load_model, load_weights, saved_model_config
from shaq.codec import compress, decompress, read_file
from shaq.data import DataError
from shaq.device import autocast_dtype, mixed_precision, pick_device, resolve_amp
from shaq.evaluate import DynamicEval, NonFiniteError, evaluate, evaluate_dynamic
from shaq.generate import generate
from shaq.models import MODELS, build_model, model_class, model_config
from shaq.parallel import load_corpus
from shaq.runlock import RunLockError
from shaq.train import TrainConfig, Trainer, TrainingError, TrainingInterrupted
from shaq.train_config import saved_train_config

PRESETS = ("smoke", "cpu", "paper")


class _Parser(argparse.ArgumentParser):
    """argparse, but a mistake is one line on stderr (no usage dump) and exit status 2."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _fail(message: str) -> typing.NoReturn:
    print(f"shaq: error: {message}", file=sys.stderr)
    raise SystemExit(2)


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


def _option(name: str) -> str:
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
        flags = [_option(name)] + aliases.get(name, [])
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


PRETRAINED = "pretrained:"
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
    train.set_defaults(handler=_train)

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
    ev.set_defaults(handler=_eval)

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
    comp.set_defaults(handler=_compress)

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
    dec.set_defaults(handler=_decompress)

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
    gen.set_defaults(handler=_generate)
    return parser


# ----------------------------------------------------------------------------- commands


def _train(args: argparse.Namespace) -> int:
    given = vars(args)
    if args.rnn is not None:
        _fail(
            f"--rnn {args.rnn} is not an option: --model picks the model and with it the recurrent "
            "layer (sharnn: LSTM, shaq: QRNN, lstm: LSTM); for QRNNs use --model shaq"
        )
    model_overrides = {name: given[name] for name in MODEL_OPTIONS if name in given}
    train_overrides = {name: given[name] for name in TRAIN_FIELDS if name in given}
    try:
        if args.resume is not None:
            if args.preset is not None:
                _fail("--resume continues a run with its saved settings; drop --preset")
            if "init_from" in train_overrides:
                _fail(
                    "--resume continues a run, --init-from starts a new one from a run's weights: "
                    "choose one"
                )
            trainer = Trainer.resume(
                args.resume,
                model_overrides=model_overrides,
                verbose=not args.quiet,
                **train_overrides,
            )
        elif train_overrides.get("init_from") is not None:
            if args.preset is not None or model_overrides:
                _fail(
                    "--init-from takes the model and the training settings of the run it starts "
                    "from; drop --preset and the model options (training options such as --lr or "
                    "--epochs override)"
                )
            trainer = Trainer.start_from(
                train_overrides.pop("init_from"), verbose=not args.quiet, **train_overrides
            )
        else:
            preset = args.preset or "cpu"
            train_config = TrainConfig.preset(preset, **train_overrides)
            _check_model_options(train_config.model, model_overrides)
            trainer = Trainer(
                train_config,
                model_config(train_config.model, preset, **model_overrides),
                verbose=not args.quiet,
            )
    except (ValueError, DataError, CheckpointError, RunLockError) as err:
        _fail(str(err))
    try:
        trainer.fit()
    except TrainingInterrupted as err:
        print(f"shaq: {err}", file=sys.stderr)
        return 128 + err.signum  # the shell's convention for a process ended by a signal
    except (
        TrainingError,
        CheckpointError,
    ) as err:  # CheckpointError: a best.pt damaged since it was saved
        print(f"shaq: {err}", file=sys.stderr)
        return 1
    except (
        KeyboardInterrupt
    ):  # outside the training loop: during the final test, after last.pt was saved
        print(
            f"\ninterrupted at step {trainer.progress.step}; continue with: python -m shaq train "
            f"--resume {trainer.run_dir}",
            file=sys.stderr,
        )
        return 130
    return 0


def _check_model_options(model: str, overrides: dict) -> None:
    """Stop before any work if an option given is a field of another model's config."""
    config_class = model_class(model).config_class
    names = [f.name for f in fields(config_class) if f.name not in NOT_OPTIONS]
    for name in overrides:
        if name not in names:
            _fail(
                f"{_option(name)} is not an option of --model {model} ({config_class.__name__}: "
                f"{', '.join(names)})"
            )


def _load_model(spec: str, device: torch.device) -> tuple[torch.nn.Module, dict]:
    """The model and checkpoint that `spec` names: a .pt file or run folder
    (`shaq.checkpoint.load_model`), or pretrained:NAME, a model that ships with shaq."""
    if not spec.startswith(PRETRAINED):
        return load_model(spec, device)
    checkpoint = shaq.pretrained.checkpoint(spec.removeprefix(PRETRAINED))
    model = build_model(checkpoint["model_name"], saved_model_config(checkpoint))
    load_weights(model, checkpoint)
    return model.to(device).eval(), checkpoint


def _eval(args: argparse.Namespace) -> int:
    try:
        device = pick_device(args.device)
        model, checkpoint = _load_model(args.checkpoint, device)
        config = saved_train_config(args.checkpoint, checkpoint)
        corpus = load_corpus(config.data, args.data_root or config.data_root)
        batch_size = args.batch_size or (
            config.eval_batch_size if args.split == "valid" else config.test_batch_size
        )
        if batch_size < 1 or (args.bytes is not None and args.bytes < 2):
            _fail("--batch-size must be >= 1 and --bytes >= 2")
        split = getattr(corpus, args.split)
        amp_dtype = autocast_dtype(resolve_amp(config.amp, device))
        if args.dynamic:
            settings = DynamicEval(lr=args.dynamic_lr, decay=args.dynamic_decay)
            bpb = evaluate_dynamic(
                model, split, config.seq_len, args.bytes, settings, amp_dtype, rows=batch_size
            )
        else:
            bpb = evaluate(model, split, batch_size, config.seq_len, args.bytes, amp_dtype)
    except NonFiniteError as err:
        _fail(f"{args.checkpoint}: {err}")
    except (ValueError, DataError, CheckpointError) as err:
        _fail(str(err))
    n = split[: args.bytes].numel()
    how = f"batch {batch_size}, " + (
        f"DYNAMIC evaluation: lr {args.dynamic_lr:g}, decay {args.dynamic_decay:g}"
        if args.dynamic
        else "static"
    )
    print(
        f"{args.split} bpb {bpb:.4f} on {n:,} bytes of {corpus.name} ({how}, bptt "
        f"{config.seq_len}; {checkpoint['model_name']} at step {checkpoint['step']:,})"
    )
    return 0


def _generate(args: argparse.Namespace) -> int:
    try:
        device = pick_device(args.device)
        model, checkpoint = _load_model(args.checkpoint, device)
        amp = resolve_amp(saved_train_config(args.checkpoint, checkpoint).amp, device)
        with mixed_precision(
            device, autocast_dtype(amp)
        ):  # the precision the weights were trained in
            out = generate(
                model,
                args.prompt.encode("utf-8"),
                args.n,
                temperature=args.temperature,
                top_p=args.top_p,
                seed=args.seed,
            )
    except (ValueError, CheckpointError) as err:
        _fail(str(err))
    sys.stdout.buffer.write(out)
    sys.stdout.buffer.flush()
    return 0


def _compress(args: argparse.Namespace) -> int:
    if args.threads < 1:
        _fail(f"--threads must be >= 1, got {args.threads}")
    torch.set_num_threads(args.threads)  # part of the arithmetic: OUT records it
    try:
        model, _ = _load_model(args.checkpoint, pick_device(args.device))
        data = Path(args.input).read_bytes()
        blob = compress(model, data, lanes=args.lanes, progress=not args.quiet)
        Path(args.output).write_bytes(blob)
    except OSError as err:
        _fail(f"{err.filename}: {err.strerror}")
    except (ValueError, CheckpointError) as err:
        _fail(str(err))
    if not args.quiet:
        bits = 8 * len(blob) / len(data) if data else float("nan")
        print(
            f"{args.input}: {len(data):,} -> {len(blob):,} bytes ({bits:.3f} bits per byte)",
            file=sys.stderr,
        )
    return 0


def _decompress(args: argparse.Namespace) -> int:
    try:
        blob = Path(args.input).read_bytes()
        torch.set_num_threads(read_file(blob)[0]["setup"]["threads"])  # as when it was compressed
        model, _ = _load_model(args.checkpoint, pick_device(args.device))
        data = decompress(model, blob, progress=not args.quiet)
        Path(args.output).write_bytes(data)
    except OSError as err:
        _fail(f"{err.filename}: {err.strerror}")
    except (ValueError, CheckpointError) as err:  # CodecError is a ValueError
        _fail(str(err))
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
