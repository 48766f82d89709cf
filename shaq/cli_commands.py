"""What each command of `python -m shaq` does (see `shaq.__main__`), in COMMANDS.

Each takes the parsed arguments (`shaq.cli_parser.parse_args`) and returns the exit status; a
mistake found before any work stops with one line on stderr and exit status 2 (`_fail`).
"""

import argparse
import sys
import typing
from dataclasses import fields
from pathlib import Path

import torch

import shaq.pretrained
from shaq.checkpoint import CheckpointError, load_model, load_weights, saved_model_config
from shaq.cli_parser import MODEL_OPTIONS, NOT_OPTIONS, TRAIN_FIELDS, option_flag
from shaq.codec import compress, decompress, read_file
from shaq.data import DataError
from shaq.device import autocast_dtype, mixed_precision, pick_device, resolve_amp
from shaq.evaluate import DynamicEval, NonFiniteError, evaluate, evaluate_dynamic
from shaq.generate import generate
from shaq.models import build_model, model_class, model_config
from shaq.parallel import load_corpus
from shaq.runlock import RunLockError
from shaq.train import TrainConfig, Trainer, TrainingError, TrainingInterrupted
from shaq.train_config import saved_train_config

PRETRAINED = "pretrained:"


def _fail(message: str) -> typing.NoReturn:
    print(f"shaq: error: {message}", file=sys.stderr)
    raise SystemExit(2)


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
                f"{option_flag(name)} is not an option of --model {model} "
                f"({config_class.__name__}: {', '.join(names)})"
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


# The command name (as `parse_args` gives it) -> what runs it.
COMMANDS: dict[str, typing.Callable[[argparse.Namespace], int]] = {
    "train": _train,
    "eval": _eval,
    "generate": _generate,
    "compress": _compress,
    "decompress": _decompress,
}
