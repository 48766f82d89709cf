"""Training SHA-RNN, SHAQ and the LSTM baseline on enwik8 (or the offline stand-in), and evaluating them.

The procedure is the reference's (Merity 2019, main.py):

- the training bytes are laid out as `batch_size` long rows (`batchify`), and every step reads
  the next segment of all rows, left to right, with no shuffling;
- the recurrent state and the attention memory of one segment are carried into the next and
  detached in between (truncated backpropagation through time); a new epoch starts cold;
- the segment length varies around `seq_len` if asked (`shaq.data.segment_length`);
- LAMB with minimum trust (or Adam), linear warmup then a constant rate, gradient clipping;
- validation in bits per byte from time to time, and at the end a test evaluation of the
  best-validated weights.

A run lives in a folder holding config.json, metrics.jsonl (one line per step), last.pt,
best.pt and summary.json; `Trainer.resume` continues it exactly where last.pt left off.
One process at a time writes a run folder (`shaq.runlock`): another one that wants to is
refused before it loads anything. SIGINT (Ctrl-C, Jupyter's stop button) and SIGTERM (`kill`,
a job scheduler) stop `fit()` after the step in progress with last.pt saved, so a stop costs
no step: fit raises TrainingInterrupted, and `python -m shaq train` exits with 130 or 143.

    trainer = Trainer(TrainConfig.cpu(minutes=3), SHARNNConfig.cpu())
    summary = trainer.fit()

Under `torchrun --nproc_per_node N` the same code runs data-parallel: each process takes its
share of the rows, DistributedDataParallel averages the gradients, metrics are summed over the
processes, and only rank 0 writes files and shows progress.
"""

import contextlib
import json
import math
import os
import random
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

import shaq
from shaq.checkpoint import (
    CheckpointError, Progress, check_model, find_checkpoint, load_checkpoint, load_weights, remove_temp_files, rng_state,
    save_checkpoint, set_rng_state, state_from_dict, state_to_dict,
)
from shaq.data import Corpus, DataError, batchify, get_segment, load_enwik8, load_standin, segment_length
from shaq.device import DEVICES, Distributed, all_reduce_sum, autocast_dtype, init_distributed
from shaq.models import MODELS, SHARNNConfig, State, build_model, check_model_choice, detach
from shaq.optim import LAMB
from shaq.runlock import RunLock, check_not_locked

LN2 = math.log(2)


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss, a checkpoint that cannot be written, weights that test
    non-finite); the message names the step and what to do."""


class NonFiniteError(ValueError):
    """`evaluate` got a NaN or infinite loss: the weights are damaged or diverged, so there is no result."""


class TrainingInterrupted(KeyboardInterrupt):
    """`fit()` stopped on SIGINT or SIGTERM after finishing its step and saving last.pt.

    A KeyboardInterrupt, so that a notebook cell (or a script that does not catch it) stops as
    on any interrupt. `signum` is the signal, `step` the step saved, `run_dir` the run; the
    message says how to continue.
    """

    def __init__(self, signum: int, step: int, run_dir: Path):
        super().__init__(
            f"stopped by {signal.Signals(signum).name} after step {step:,}, saved in {run_dir / 'last.pt'}; "
            f"continue with: python -m shaq train --resume {run_dir}")
        self.signum, self.step, self.run_dir = signum, step, run_dir


# ----------------------------------------------------------------------------- config


@dataclass
class TrainConfig:
    """How to train: data, batches, optimisation, evaluation, where to write. Presets: `smoke()`,
    `cpu()`, `paper()`. The defaults are the reference's first pass (README command + main.py).

    Sizes are in bytes (= tokens) unless named otherwise. A run stops after `epochs` passes over
    the training data, `steps` steps or `minutes` of wall-clock time, whichever comes first
    (validations count, the final evaluation does not); at least one of the three is set.
    `init_from` starts a new run from another run's weights with a fresh optimizer and
    schedule (the reference's second pass).
    """

    model: str = "shaq"  # 'shaq', 'sharnn' or 'lstm'
    data: str = "enwik8"  # 'enwik8', 'standin', or 'auto': enwik8 if obtainable, else the stand-in
    data_root: str = "data"  # where enwik8.zip / enwik8 are looked for and downloaded to
    max_bytes: int | None = None  # train on this prefix of the training split only
    batch_size: int = 16  # parallel rows, over all processes
    seq_len: int = 1024  # segment length (BPTT), also used for evaluation
    variable_seq_len: bool = True  # vary the training segment length as the reference did
    epochs: float | None = 32  # passes over the training data (fractions allowed)
    steps: int | None = None
    minutes: float | None = None
    optimizer: str = "lamb"  # 'lamb' (LAMB with minimum trust) or 'adam'
    lr: float = 2e-3
    warmup: int = 800  # steps of linear warmup, then a constant rate
    weight_decay: float = 1.2e-6
    min_trust: float = 0.25  # LAMB's floor of the trust ratio
    clip: float = 0.25  # max global gradient norm; 0 = no clipping
    eval_interval: int = 0  # steps between validations; 0 = only at the end (and epoch ends, below)
    eval_each_epoch: bool = True  # also validate when an epoch ends, as the reference does
    eval_bytes: int | None = None  # validate on this prefix of the valid split (None = all of it)
    eval_batch_size: int = 16  # rows for validation
    test_batch_size: int = 8  # rows for the final test (8 in the reference: results depend on it)
    final_bytes: int | None = None  # prefix of valid and test for the final evaluation (None = all)
    save_interval: int = 1000  # steps between saves of last.pt; 0 = only at the end
    seed: int = 5512
    device: str = "auto"  # 'auto' (CUDA, then MPS, then CPU), 'cuda', 'cuda:1', 'mps' or 'cpu'
    amp: bool = True  # mixed precision on CUDA (bf16, or fp16 with a gradient scaler)
    compile: bool = False  # torch.compile the model (0.58x eager for SHAQ on a 2-core CPU: see README)
    on_nonfinite: str = "stop"  # a NaN/inf loss: 'stop' (raise TrainingError) or 'skip' the step
    out_dir: str | None = None  # the run folder; None = runs/<model>-<date>-<time>
    init_from: str | None = None  # a checkpoint whose weights start a new run (fresh optimizer and schedule)

    def __post_init__(self):
        problems = []

        def need(ok: bool, message: str) -> None:
            if not ok:
                problems.append(message)

        need(self.model in MODELS, f"model must be one of {sorted(MODELS)}, got {self.model!r}")
        need(self.data in ("auto", "enwik8", "standin"), f"data must be 'auto', 'enwik8' or 'standin', got {self.data!r}")
        for name in ("batch_size", "seq_len", "eval_batch_size", "test_batch_size"):
            need(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_bytes", "eval_bytes", "final_bytes"):
            value = getattr(self, name)
            need(value is None or value >= 2, f"{name} must be >= 2 bytes or None (= the whole split), got {value}")
        need(not self.variable_seq_len or self.seq_len >= 5,
             f"variable_seq_len needs seq_len >= 5 (lengths are clamped to [5, seq_len]), got {self.seq_len}")
        need(self.epochs is not None or self.steps is not None or self.minutes is not None,
             "set epochs, steps or minutes (any of them) to say when to stop")
        need(self.epochs is None or self.epochs > 0, f"epochs must be > 0 or None, got {self.epochs}")
        need(self.steps is None or self.steps >= 1, f"steps must be >= 1 or None, got {self.steps}")
        need(self.minutes is None or self.minutes > 0, f"minutes must be > 0 or None, got {self.minutes}")
        need(self.optimizer in ("lamb", "adam"), f"optimizer must be 'lamb' or 'adam', got {self.optimizer!r}")
        need(self.lr > 0, f"lr must be > 0, got {self.lr}")
        need(self.warmup >= 0, f"warmup must be >= 0 steps, got {self.warmup}")
        need(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        need(0 <= self.min_trust < 1, f"min_trust must be in [0, 1), got {self.min_trust}")
        need(self.clip >= 0, f"clip must be >= 0 (0 = no clipping), got {self.clip}")
        need(self.eval_interval >= 0, f"eval_interval must be >= 0 (0 = only at the end), got {self.eval_interval}")
        need(self.save_interval >= 0, f"save_interval must be >= 0 (0 = only at the end), got {self.save_interval}")
        need(self.device.split(":")[0] in DEVICES, f"device must be one of {list(DEVICES)} (or e.g. 'cuda:1'), got {self.device!r}")
        need(self.on_nonfinite in ("stop", "skip"), f"on_nonfinite must be 'stop' or 'skip', got {self.on_nonfinite!r}")
        if problems:
            raise ValueError("invalid TrainConfig: " + "; ".join(problems))

    @classmethod
    def paper(cls, **overrides) -> "TrainConfig":
        """The reference's first pass: enwik8, LAMB 2e-3, warmup 800, batch 16 x 1024 (variable), 32
        epochs, validation at the end of each. Its second pass is a new run from the best weights:
        `paper(init_from="RUN/best.pt", lr=1e-3, epochs=5, seed=125)`."""
        return cls(**overrides)

    @classmethod
    def cpu(cls, **overrides) -> "TrainConfig":
        """Ten minutes on 2 CPU cores with SHARNNConfig.cpu(): batch 16 x 256, a short warmup, and
        a final evaluation on at most 1 MB of valid and test (all of the stand-in's)."""
        return replace(cls(data="auto", seq_len=256, epochs=None, minutes=10, warmup=100, eval_interval=200,
                           eval_each_epoch=False, eval_bytes=131_072, final_bytes=1_000_000, save_interval=200),
                       **overrides)

    @classmethod
    def smoke(cls, **overrides) -> "TrainConfig":
        """Seconds, for tests and CI: 20 steps of 4 x 32 on a 100 kB prefix of the stand-in."""
        return replace(cls(data="standin", max_bytes=100_000, batch_size=4, seq_len=32, variable_seq_len=False,
                           epochs=None, steps=20, warmup=5, eval_interval=10, eval_each_epoch=False,
                           eval_bytes=4096, eval_batch_size=4, test_batch_size=4, final_bytes=8192,
                           save_interval=10), **overrides)

    @classmethod
    def preset(cls, name: str, **overrides) -> "TrainConfig":
        """A preset by name: 'paper', 'cpu' or 'smoke'."""
        presets = {"paper": cls.paper, "cpu": cls.cpu, "smoke": cls.smoke}
        if name not in presets:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(presets)}")
        return presets[name](**overrides)

    def to_dict(self) -> dict:
        return asdict(self)


# Fields that checkpoints of shaq 0.1 lack, with the values that reproduce how those runs ran.
LEGACY_TRAIN_FIELDS = {"epochs": None, "eval_each_epoch": False, "init_from": None}

# Settings a resumed run may change: how long it runs and how it reports, not what it computes.
RESUMABLE = frozenset({"epochs", "steps", "minutes", "eval_interval", "save_interval", "final_bytes", "device", "amp",
                       "compile", "on_nonfinite", "data_root"})


# ----------------------------------------------------------------------------- data


def load_corpus(data: str, root: str = "data", info: Distributed = Distributed(), verbose: bool = True) -> Corpus:
    """The corpus for TrainConfig.data: 'standin', 'enwik8' (DataError if unobtainable) or 'auto'.

    'auto' takes enwik8 from `root` (downloading it if needed) and falls back to the stand-in
    with a notice. In a multi-process run rank 0 alone downloads; the others then read its files.
    """
    if data == "standin":
        return load_standin()
    corpus, error = None, None
    if info.is_main:
        try:
            corpus = load_enwik8(root)
        except DataError as err:
            error = str(err)
    if info.enabled:
        shared = [error]
        dist.broadcast_object_list(shared, src=0)
        error = shared[0]
    if error is not None:
        if data == "enwik8":
            raise DataError(error)
        if verbose and info.is_main:
            print(f"data 'auto': enwik8 is not available ({error})\n  -> training on the offline stand-in instead")
        return load_standin()
    return corpus if corpus is not None else load_enwik8(root, download=False)


def _warmup(warmup: int) -> Callable[[int], float]:
    """The LR factor for scheduler step s (0-based): linear from 1/warmup up to 1, then constant."""
    return lambda s: min(s + 1, warmup) / warmup if warmup > 0 else 1.0


# ----------------------------------------------------------------------------- evaluation


def _autocast(device: torch.device, dtype: torch.dtype | None):
    return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


@torch.no_grad()
def _sum_nats(model: nn.Module, columns: torch.Tensor, bptt: int, amp_dtype: torch.dtype | None) -> tuple[float, int]:
    """Total cross-entropy in nats over columns [B, N] and the number of bytes it predicted (B * (N - 1)).

    Walks fixed segments of `bptt` (the last one shorter) in eval mode, carrying state and
    memory from one to the next; both start empty.
    """
    if columns.size(0) == 0:  # a process with no rows of a small evaluation batch
        return 0.0, 0
    device = columns.device
    was_training = model.training
    model.eval()
    try:
        state, sums = None, []
        for pos in range(0, columns.size(1) - 1, bptt):
            inputs, targets = get_segment(columns, pos, bptt)
            with _autocast(device, amp_dtype):
                out = model(inputs, state=state, targets=targets)
            sums.append(out.loss.float() * targets.numel())  # mean -> sum: weights each segment by its size
            state = out.state
        # Sum in float64 on the CPU: millions of bytes, and one device sync for the whole pass.
        return torch.stack(sums).cpu().double().sum().item(), columns.size(0) * (columns.size(1) - 1)
    finally:
        model.train(was_training)


def evaluate(
    model: nn.Module,
    data: torch.Tensor,
    batch_size: int = 8,
    bptt: int = 1024,
    max_bytes: int | None = None,
    amp_dtype: torch.dtype | None = None,
) -> float:
    """Bits per byte of `model` on `data` [n] (bytes), the reference's protocol.

    The data (or its first `max_bytes`) is batchified into `batch_size` rows; segments of `bptt`
    are read in order with the state and attention memory carried across, in eval mode; the
    mean cross-entropy over all predicted bytes (each segment weighted by its length) is
    divided by ln 2. (The reference divides the sum by N instead of N - 1 per row, a
    difference of 1/N.) More rows mean more cold starts and a slightly worse number: the
    reference tests with 8.

    Raises NonFiniteError when the loss is NaN or infinite: no number of bits per byte is
    right then, and a `nan` printed as a result would pass for one.
    """
    device = next(model.parameters()).device
    columns = batchify(data[:max_bytes], batch_size).to(device)
    nats, count = _sum_nats(model, columns, bptt, amp_dtype)
    bpb = nats / count / LN2
    if not math.isfinite(bpb):
        raise NonFiniteError(
            f"the weights give a non-finite loss ({bpb} bits per byte on {count:,} predicted bytes): "
            "they are damaged or diverged. Evaluate the run's other checkpoint (best.pt / last.pt), "
            "or retrain with a lower --lr or --clip")
    return bpb


# ----------------------------------------------------------------------------- the trainer


class Trainer:
    """Trains one model as `config` says; `fit()` runs it, `Trainer.resume(folder)` continues one.

    Args:
        config: the training settings.
        model_config: the model's shape (SHARNNConfig.cpu() etc.); `config.model` picks the kind.
        callback: called on rank 0 after every step with that step's metrics dict (the line
            written to metrics.jsonl: step, time, bytes, loss, bpb, lr, grad_norm, seq_len, and
            valid_bpb on validation steps), e.g. to draw a live plot in a notebook.
        verbose: print the header, a progress bar and the summary (rank 0 only).

    Attributes: `model` (the raw module, whose weights are saved), `run_dir`, `corpus`, and
    `progress` (where the run stands: step, epoch, bytes, ...). After `fit()` the model holds the
    weights it tested: those of the best validation.

    Under torchrun the process group is joined here and left to the caller to destroy.
    """

    def __init__(
        self,
        config: TrainConfig,
        model_config: SHARNNConfig,
        *,
        callback: Callable[[dict], None] | None = None,
        verbose: bool = True,
        _checkpoint: dict | None = None,
        _source: dict | None = None,
    ):
        self.callback, self.verbose = callback, verbose
        check_model_choice(config.model, model_config)  # before any work
        self.dist, self.device = init_distributed(config.device)
        world = self.dist.world_size
        if config.batch_size % world:
            raise ValueError(f"batch_size {config.batch_size} does not split over {world} processes; use a multiple of {world}")
        if self.dist.is_main and config.out_dir is not None:
            # Before any work: refuse a folder that another process writes, or a new run into an old one.
            check_not_locked(config.out_dir)
            _refuse_existing_run(Path(config.out_dir), _checkpoint)
        self.amp_dtype = autocast_dtype(self.device, config.amp)
        if self.device.type == "cuda":
            torch.set_float32_matmul_precision("high")  # TF32 for whatever autocast leaves in float32

        self.corpus = load_corpus(config.data, config.data_root, self.dist, verbose)
        # Record what 'auto' chose, so a resumed run and the saved config name the real data.
        self.config = config = replace(config, data="enwik8" if self.corpus.name == "enwik8" else "standin")
        # This process's rows of the global batch; all processes walk their rows in lockstep.
        rows = batchify(self.corpus.train[: config.max_bytes], config.batch_size).chunk(world)[self.dist.rank]
        self.train_data = rows.to(self.device)  # [B / world, N]
        self.valid_data = self._eval_rows(self.corpus.valid, config.eval_bytes, config.eval_batch_size)

        # Identical initial weights on every process (DDP would broadcast rank 0's anyway);
        # then each process gets its own stream for dropout.
        torch.manual_seed(config.seed)
        self.model = build_model(config.model, model_config).to(self.device)
        self.model_config = self.model.config  # SHAQ's has rnn='qrnn' filled in
        # Where a run that starts from another's weights started (None otherwise); a resumed
        # run has its weights from last.pt instead.
        self.started_from = None
        if config.init_from is not None and _checkpoint is None:
            self.started_from = self._load_initial_weights(config.init_from, _source)
        random.seed(config.seed + self.dist.rank)
        torch.manual_seed(config.seed + self.dist.rank)
        self.n_params = sum(p.numel() for p in self.model.parameters())

        if config.optimizer == "lamb":  # betas (0.9, 0.999) and eps 1e-6: the reference's
            self.optimizer = LAMB(self.model.parameters(), lr=config.lr, weight_decay=config.weight_decay,
                                  min_trust=config.min_trust)
        else:
            self.optimizer = torch.optim.Adam(self.model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, _warmup(config.warmup))
        # Only float16 needs loss scaling; disabled, the scaler passes everything through.
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        # Variable segment lengths come from their own generator, the same on every process,
        # so all processes cut the same segments and a checkpoint can restore the sequence.
        self.data_rng = torch.Generator().manual_seed(config.seed)

        self.forward_model: nn.Module = self.model
        if config.compile:
            self.forward_model = torch.compile(self.forward_model)
        if self.dist.enabled:
            # device_ids=None: the module sits on one device already, and inputs (with the
            # State dataclass) need no scattering.
            self.forward_model = DistributedDataParallel(self.forward_model, device_ids=None)

        self.progress = Progress()
        self.carried: State | None = None
        self.time_up = False
        self._signal: int | None = None  # SIGINT or SIGTERM, once caught during fit()
        self._stop_agreed = False  # whether any process had caught one at the last step's all-reduce
        self._handlers: dict[int, object] = {}  # the handlers SIGINT and SIGTERM had before fit() took them
        self._lock: RunLock | None = None
        try:
            self.run_dir = self._setup_run_dir(_checkpoint)  # takes the lock
            if _checkpoint is not None:
                self._restore(_checkpoint)
        except BaseException:
            self.close()  # a Trainer that failed to start must not keep its folder locked
            raise

    @classmethod
    def resume(
        cls,
        path: str | Path,
        *,
        model_overrides: dict | None = None,
        callback: Callable[[dict], None] | None = None,
        verbose: bool = True,
        **overrides,
    ) -> "Trainer":
        """Continue the run whose folder (or checkpoint file) is `path`, from its last.pt.

        The run's saved configs are used. `overrides` may change only how long it runs and how
        it reports (RESUMABLE: steps, minutes, device, ...); any other TrainConfig field or any
        `model_overrides` entry that differs from the checkpoint raises CheckpointError; a run
        that another process is writing raises RunLockError before anything is read.
        """
        path = Path(path)
        file = path / "last.pt" if path.is_dir() else path
        # Rank 0 will write (torchrun's RANK: the process group is not joined yet).
        if path.exists() and int(os.environ.get("RANK", "0")) == 0:
            check_not_locked(file.parent)
        checkpoint = load_checkpoint(file)
        saved = {**LEGACY_TRAIN_FIELDS, **checkpoint["train_config"]}
        problems = [f"{key} {saved.get(key)!r} (checkpoint) vs {value!r}" for key, value in overrides.items()
                    if key not in RESUMABLE and saved.get(key) != value]
        problems += [f"{key} {checkpoint['model_config'].get(key)!r} (checkpoint) vs {value!r}"
                     for key, value in (model_overrides or {}).items() if checkpoint["model_config"].get(key) != value]
        if problems:
            raise CheckpointError(
                "a resumed run keeps its model and training settings (only "
                f"{', '.join(sorted(RESUMABLE))} may change); differs: " + "; ".join(problems))
        config, model_config = _saved_configs(file, checkpoint, {**saved, **overrides, "out_dir": str(file.parent)})
        return cls(config, model_config, callback=callback, verbose=verbose, _checkpoint=checkpoint)

    @classmethod
    def start_from(
        cls,
        path: str | Path,
        *,
        callback: Callable[[dict], None] | None = None,
        verbose: bool = True,
        **overrides,
    ) -> "Trainer":
        """A new run from the weights of the checkpoint (or run folder: its best.pt) at `path`,
        with a fresh optimizer, schedule and warmup: the reference's second pass, e.g.
        `Trainer.start_from("runs/x/best.pt", lr=1e-3, epochs=5, seed=125)`.

        The model is the checkpoint's; the training settings are its run's, with `overrides`
        applied (any TrainConfig field) and a new run folder (`out_dir`, default a fresh one).
        """
        file = find_checkpoint(path)
        source = load_checkpoint(file)
        saved = {**LEGACY_TRAIN_FIELDS, **source["train_config"], "out_dir": None}
        config, model_config = _saved_configs(file, source, {**saved, **overrides, "init_from": str(file)})
        return cls(config, model_config, callback=callback, verbose=verbose, _source=source)

    # ------------------------------------------------------------------------- setup helpers

    def _load_initial_weights(self, path: str, source: dict | None) -> dict:
        """Load the weights of the checkpoint at `path` (already read: `source`) into the model;
        return what config.json records of where the run started."""
        file = find_checkpoint(path)
        source = source if source is not None else load_checkpoint(file)
        check_model(source, self.config.model, self.model_config)
        load_weights(self.model, source)
        return {"checkpoint": str(file.resolve()), "model": source["model_name"], "step": source["step"],
                "best_valid_bpb": source["best_valid_bpb"], "data": source["train_config"].get("data")}

    def _eval_rows(self, split: torch.Tensor, max_bytes: int | None, batch_size: int) -> torch.Tensor:
        """This process's share of the rows of an evaluation split, on the device."""
        columns = batchify(split[:max_bytes], batch_size)
        return columns.tensor_split(self.dist.world_size)[self.dist.rank].to(self.device)

    def _setup_run_dir(self, checkpoint: dict | None) -> Path:
        """Create (rank 0) the run folder and write config.json; every process learns its path."""
        path = None
        if self.dist.is_main:
            if self.config.out_dir is not None:
                path = Path(self.config.out_dir)
            else:
                stem = Path("runs") / f"{self.config.model}-{time.strftime('%Y%m%d-%H%M%S')}"
                path, n = stem, 1
                while path.exists():
                    n += 1
                    path = stem.with_name(f"{stem.name}-{n}")
            path.mkdir(parents=True, exist_ok=True)
            # Held until fit() ends; the folder is checked again under it, as a run may have ended
            # there since the check before the corpus.
            self._lock = RunLock(path)
            _refuse_existing_run(path, checkpoint)
            remove_temp_files(path)  # under the lock: no other process is saving there
            config = {"shaq_version": shaq.__version__, "model": self.config.model,
                      "model_config": self.model_config.to_dict(), "train_config": self.config.to_dict(),
                      "started_from": _recorded_start(path) if checkpoint is not None else self.started_from}
            (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
            if checkpoint is not None:
                _trim_log(path / "metrics.jsonl", checkpoint["step"])
        if self.dist.enabled:
            shared = [path]
            dist.broadcast_object_list(shared, src=0)
            path = shared[0]
        self.config = replace(self.config, out_dir=str(path))
        return path

    def _restore(self, checkpoint: dict) -> None:
        """Load everything a checkpoint holds into this freshly built trainer."""
        check_model(checkpoint, self.config.model, self.model_config)
        load_weights(self.model, checkpoint)
        try:
            self.optimizer.load_state_dict(checkpoint["optimizer"])
            self.scheduler.load_state_dict(checkpoint["scheduler"])
            if self.scaler.is_enabled() and checkpoint["scaler"]:
                self.scaler.load_state_dict(checkpoint["scaler"])
        except (ValueError, KeyError, RuntimeError) as err:
            raise CheckpointError(f"the checkpoint's optimizer state does not fit: {err}") from err
        self.data_rng.set_state(checkpoint["data_rng"])
        # One RNG state per process; a run resumed on more processes seeds the extra ones afresh.
        if self.dist.rank < len(checkpoint["rng"]):
            set_rng_state(checkpoint["rng"][self.dist.rank], self.device)
        state = state_from_dict(checkpoint["state"], self.device)
        if state is not None:  # saved for the global batch: take this process's rows
            world, rank = self.dist.world_size, self.dist.rank
            state = state.map(lambda t: t.chunk(world)[rank])
        self.carried = state
        self.progress = Progress.from_dict(checkpoint)

    # ------------------------------------------------------------------------- checkpoints

    def _position(self) -> dict:
        """Where the run stands between two steps (a copy): everything in a checkpoint but the state dicts."""
        return {"rng": rng_state(self.device), "data_rng": self.data_rng.get_state(), "state": self.carried,
                **self.progress.to_dict()}

    def _save(self, name: str, position: dict | None = None) -> None:
        """Save a checkpoint of `position` (default: now) as run_dir/name. Every process must call
        it (the carried states and RNG states are gathered); rank 0 writes. A write that fails
        (a full disk) raises TrainingError in every process: the run cannot go on unsaved."""
        position = position if position is not None else self._position()
        state, rngs = position["state"], [position["rng"]]
        if self.dist.enabled:
            state = _gather_state(state, self.dist.world_size)
            rngs = [None] * self.dist.world_size
            dist.all_gather_object(rngs, position["rng"])
        failure = None
        if self.dist.is_main:
            try:
                save_checkpoint({
                    **position,
                    "rng": rngs,
                    "state": state_to_dict(state),
                    "model_name": self.config.model,
                    "model_config": self.model_config.to_dict(),
                    "train_config": self.config.to_dict(),
                    "model": self.model.state_dict(),
                    "optimizer": self.optimizer.state_dict(),
                    "scheduler": self.scheduler.state_dict(),
                    "scaler": self.scaler.state_dict(),
                    "world_size": self.dist.world_size,
                }, self.run_dir / name)
            except CheckpointError as err:
                failure = (f"{err}. Training stopped at step {self.progress.step:,}; once the disk has room (or the "
                           "folder lets us write), continue from the last checkpoint saved with "
                           f"--resume {self.run_dir}")
        if self.dist.enabled:  # the others stop too, rather than wait for rank 0 at the next step
            shared = [failure]
            dist.broadcast_object_list(shared, src=0)
            failure = shared[0]
        if failure is not None:
            raise TrainingError(failure)

    # ------------------------------------------------------------------------- the loop

    def _train_step(self) -> dict:
        """One segment: forward, backward, clip, step. Returns the step's metrics."""
        config = self.config
        if self._epoch_ended():  # the last step read the end of the data: a new epoch starts cold
            self.progress.cursor, self.progress.epoch, self.carried = 0, self.progress.epoch + 1, None
        before = self._position()  # the last good state, should this step turn out non-finite
        start = time.perf_counter()
        length = segment_length(config.seq_len, config.variable_seq_len, self.data_rng)
        inputs, targets = get_segment(self.train_data, self.progress.cursor, length)  # [B / world, T]
        with _autocast(self.device, self.amp_dtype):
            out = self.forward_model(inputs, state=self.carried, targets=targets)
        self.scaler.scale(out.loss).backward()  # DDP averages the gradients over processes here
        self.scaler.unscale_(self.optimizer)
        grad_norm = nn.utils.clip_grad_norm_(self.model.parameters(), config.clip if config.clip > 0 else math.inf)
        # One collective per step: the summed losses and whether any process ran out of time or
        # caught a stop signal (all must stop at the same step, or the others would wait forever).
        self.progress.elapsed = time.perf_counter() - self._started
        time_up = config.minutes is not None and self.progress.elapsed >= 60 * config.minutes
        flags = torch.tensor([float(time_up), float(self._signal is not None)], device=self.device)
        totals = all_reduce_sum(torch.cat([out.loss.detach().float().view(1), flags]), self.dist).tolist()
        loss, grad_norm = totals[0] / self.dist.world_size, grad_norm.item()
        lr = self.optimizer.param_groups[0]["lr"]
        # The fp16 scaler skips steps with inf gradients by design; without it they would
        # poison the weights, so they count as non-finite too.
        finite = math.isfinite(loss) and (self.scaler.is_enabled() or math.isfinite(grad_norm))
        if finite:
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.scheduler.step()
            self.carried = detach(out.state)
        self.optimizer.zero_grad(set_to_none=True)
        if not finite:
            if config.on_nonfinite == "stop":
                self._save("last.pt", before)
                raise TrainingError(
                    f"non-finite loss at step {self.progress.step + 1} (loss {loss}, grad norm {grad_norm}); stopped. "
                    f"{self.run_dir / 'last.pt'} holds the state before it. Start a new run with a lower "
                    f"--lr or --clip, or resume with --resume {self.run_dir} --on-nonfinite skip")
            self.progress.nonfinite_steps += 1
            self.carried = None  # the state may be poisoned too: restart it
        self.progress.cursor += inputs.size(1)
        self.progress.step += 1
        self.progress.bytes += inputs.size(1) * config.batch_size
        self.progress.train_seconds += time.perf_counter() - start
        self.time_up, self._stop_agreed = totals[1] > 0, totals[2] > 0
        metrics = {"step": self.progress.step, "time": round(self.progress.elapsed, 3), "bytes": self.progress.bytes,
                   "loss": loss if finite else None, "bpb": loss / LN2 if finite else None, "lr": lr,
                   "grad_norm": grad_norm if math.isfinite(grad_norm) else None, "seq_len": inputs.size(1)}
        if not finite:
            metrics["skipped"] = True
        return metrics

    def _bpb(self, rows: torch.Tensor) -> float:
        """Bits per byte over every process's rows (sums of nats and bytes are all-reduced)."""
        nats, count = _sum_nats(self.model, rows, self.config.seq_len, self.amp_dtype)
        if self.dist.enabled:
            totals = torch.tensor([nats, count], dtype=torch.float64, device=self.device)
            nats, count = all_reduce_sum(totals, self.dist).tolist()
        return nats / count / LN2

    @property
    def epochs_done(self) -> float:
        """Passes over the training data so far, with the current one's fraction: 2.5 is halfway
        through the third epoch."""
        last = self.train_data.size(1) - 1
        return self.progress.epoch + min(self.progress.cursor, last) / last

    def _epoch_ended(self) -> bool:
        """Whether the last step read the end of the training data."""
        return self.progress.cursor >= self.train_data.size(1) - 1

    def _done(self) -> bool:
        config = self.config
        return (self.time_up or (config.steps is not None and self.progress.step >= config.steps)
                or (config.epochs is not None and self.epochs_done >= config.epochs))

    def fit(self) -> dict:
        """Train until `epochs`, `steps` or `minutes`, validate, test the best weights; return the summary.

        Summary keys: model, data, params, steps, bytes, seconds, bytes_per_second (training
        steps only), valid_bpb and test_bpb (of the weights of tested_step, the best
        validation, on the first valid_bytes / test_bytes of each split), nonfinite_steps,
        run_dir. Also written to summary.json.

        SIGINT and SIGTERM (caught when fit runs in the main thread) end training after the step
        in progress: last.pt is saved, a second signal meanwhile is ignored, and fit raises
        TrainingInterrupted (a KeyboardInterrupt) instead of testing. When fit returns or raises,
        the signals have their previous handlers back and the run folder is released, so that
        Trainer.resume of it may follow in the same process.

        A validation during training that is not finite is logged and never becomes the best;
        a non-finite final valid or test bpb raises TrainingError (there is no result to
        report). TrainingError also comes from a non-finite training loss with
        on_nonfinite='stop' and from a checkpoint that cannot be written.
        """
        if self.dist.is_main and self._lock is None:  # an earlier fit() let the folder go
            self._lock = RunLock(self.run_dir)
        self._signal, self._stop_agreed = None, False
        try:
            return self._fit()
        finally:
            self._restore_signals()
            self.close()

    def close(self) -> None:
        """Release the run folder, so that another Trainer of it (Trainer.resume) may start; fit()
        does this when it ends. Also what `with Trainer(...) as trainer:` does at the end."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def __enter__(self) -> "Trainer":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _fit(self) -> dict:
        """fit() with the folder held: train, save, test."""
        config, main = self.config, self.dist.is_main
        if self.verbose and main:
            print(self._header())
        log = open(self.run_dir / "metrics.jsonl", "a") if main else None
        bar = _ProgressBar(self, disable=not (self.verbose and main))
        bytes_before, seconds_before, valid_bpb = self.progress.bytes, self.progress.train_seconds, None  # for this session's rate
        self.model.train()
        self._started = time.perf_counter() - self.progress.elapsed  # the clock goes on from a resumed run's time
        self._catch_signals()
        try:
            while not self._done() and not self._stop_requested():
                metrics = self._train_step()
                if ((config.eval_interval and self.progress.step % config.eval_interval == 0)
                        or (config.eval_each_epoch and self._epoch_ended()) or self._done()):
                    valid_bpb = metrics["valid_bpb"] = self._validate()
                if config.save_interval and self.progress.step % config.save_interval == 0 and not self._done():
                    self._save("last.pt")
                if main:
                    log.write(json.dumps(metrics) + "\n")
                    log.flush()
                    if self.callback is not None:
                        self.callback(metrics)
                rate = (self.progress.bytes - bytes_before) / max(self.progress.train_seconds - seconds_before, 1e-9)
                bar.update(self, _postfix(metrics, valid_bpb, rate))
        finally:
            bar.close()
            if log is not None:
                log.close()
        self.progress.elapsed = time.perf_counter() - self._started
        self._save("last.pt")
        self._restore_signals()  # a signal during the test interrupts it as usual: last.pt is saved
        if self._stop_requested():
            # Under torchrun a process may stop for another's signal: it reports SIGTERM, a job's usual stop.
            raise TrainingInterrupted(self._signal or signal.SIGTERM, self.progress.step, self.run_dir)
        if self._signal is not None:  # caught after the processes last agreed to go on: deliver it now
            signal.raise_signal(self._signal)
        summary = self._final_evaluation()
        if self.verbose and main:
            print(format_summary(summary))
        return summary

    def _catch_signals(self) -> None:
        """Make SIGINT and SIGTERM ask for a stop after the step in progress, keeping the handlers
        they had. Only the main thread may set handlers (a fit() in another thread keeps the
        usual ones), and a signal that was ignored (SIGINT in a job a shell started with &)
        stays ignored."""
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in (signal.SIGINT, signal.SIGTERM):
            if signal.getsignal(signum) != signal.SIG_IGN:
                self._handlers[signum] = signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, frame: object) -> None:
        if self._signal is None:
            self._signal = signum
            message = f"\n{signal.Signals(signum).name}: stopping after this step; saving last.pt first\n"
        else:
            message = ("\nalready stopping: last.pt is being saved; wait for it (SIGKILL would stop at once, "
                       "losing the steps since the last save)\n")
        # os.write, not print: the signal may have come in the middle of a print (the progress bar's).
        os.write(2, message.encode())

    def _restore_signals(self) -> None:
        """Give SIGINT and SIGTERM back the handlers that _catch_signals found."""
        for signum, previous in self._handlers.items():
            # None: a handler set outside Python, which cannot be put back; the default is the next best.
            signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        self._handlers = {}

    def _stop_requested(self) -> bool:
        """Whether a signal asks to stop: as all processes agreed at the last step's all-reduce, or,
        in a single process, as soon as it is caught (one that comes during a validation stops
        the run before the next step)."""
        return self._stop_agreed if self.dist.enabled else self._signal is not None

    def _validate(self) -> float:
        """Validation bpb now; a new best is saved as best.pt. A non-finite one is returned (and
        logged) as it is, and never becomes the best."""
        bpb = self._bpb(self.valid_data)
        if math.isfinite(bpb) and (self.progress.best_valid_bpb is None or bpb < self.progress.best_valid_bpb):
            self.progress.best_valid_bpb, self.progress.best_step = bpb, self.progress.step
            self._save("best.pt")
        return bpb

    def _final_evaluation(self) -> dict:
        """Test the best-validated weights (the reference's protocol) and build the summary."""
        config = self.config
        tested_step = self.progress.step
        if self.progress.best_valid_bpb is not None and self.progress.best_step != self.progress.step:
            if self.dist.enabled:
                dist.barrier()  # best.pt is written by rank 0
            load_weights(self.model, load_checkpoint(self.run_dir / "best.pt"))
            tested_step = self.progress.best_step
        if config.final_bytes == config.eval_bytes and self.progress.best_valid_bpb is not None:
            valid_bpb = self.progress.best_valid_bpb  # the same measurement of the same weights
        else:
            valid_bpb = self._bpb(self._eval_rows(self.corpus.valid, config.final_bytes, config.eval_batch_size))
        test_bpb = self._bpb(self._eval_rows(self.corpus.test, config.final_bytes, config.test_batch_size))
        for split, bpb in (("valid", valid_bpb), ("test", test_bpb)):
            if not math.isfinite(bpb):
                raise TrainingError(
                    f"the weights of step {tested_step:,} give a non-finite {split} loss ({bpb} bpb): they "
                    f"diverged, so there is no result to report ({self.run_dir} keeps the checkpoints). "
                    "Retrain with a lower --lr or --clip")
        summary = {
            "model": config.model, "data": self.corpus.name, "params": self.n_params, "steps": self.progress.step,
            "bytes": self.progress.bytes, "seconds": round(self.progress.elapsed, 3),
            "bytes_per_second": self.progress.bytes / self.progress.train_seconds if self.progress.train_seconds else 0.0,
            "valid_bpb": valid_bpb, "test_bpb": test_bpb, "tested_step": tested_step,
            "valid_bytes": self.corpus.valid[: config.final_bytes].numel(),
            "test_bytes": self.corpus.test[: config.final_bytes].numel(),
            "nonfinite_steps": self.progress.nonfinite_steps, "run_dir": str(self.run_dir),
        }
        if self.dist.is_main:
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        return summary

    def _header(self) -> str:
        config = self.config
        precision = {None: "float32", torch.bfloat16: "bf16 autocast", torch.float16: "fp16 autocast + scaler"}
        world = f" x {self.dist.world_size} processes" if self.dist.enabled else ""
        until = " or ".join(part for part in (f"{config.epochs:g} epochs" if config.epochs else "",
                                              f"{config.steps:,} steps" if config.steps else "",
                                              f"{config.minutes:g} min" if config.minutes else "") if part)
        return (f"{config.model}: {self.n_params:,} parameters | {self.corpus.name}: "
                f"{self.train_data.numel() * self.dist.world_size:,} training bytes | {self.device}{world}, "
                f"{precision[self.amp_dtype]} | batch {config.batch_size} x {config.seq_len} | {config.optimizer} "
                f"lr {config.lr:g} | until {until} | run dir {self.run_dir}")


def _gather_state(state: State | None, world_size: int) -> State | None:
    """The carried states of all processes, concatenated along the batch: the global batch's state."""
    if state is None:
        return None

    def gather(t: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(t) for _ in range(world_size)]
        dist.all_gather(parts, t.contiguous())
        return torch.cat(parts)

    return state.map(gather)


def _refuse_existing_run(path: Path, checkpoint: dict | None) -> None:
    """A new run (no `checkpoint` to resume) may not write into a folder that holds one."""
    if checkpoint is None and (path / "last.pt").exists():
        raise ValueError(
            f"{path} already holds a run: continue it with --resume {path} or choose another --out")


def _saved_configs(file: Path, checkpoint: dict, train: dict) -> tuple[TrainConfig, SHARNNConfig]:
    """The TrainConfig of the settings `train` and the checkpoint's model config; a field this
    shaq does not know (a checkpoint from another version) is a CheckpointError naming `file`."""
    try:
        return TrainConfig(**train), SHARNNConfig(**checkpoint["model_config"])
    except TypeError as err:
        raise CheckpointError(f"{file} holds settings this shaq does not know: {err}") from err


def _recorded_start(run_dir: Path) -> dict | None:
    """What an earlier config.json of this run folder recorded under started_from (a resumed run
    keeps the record of where its first session started)."""
    try:
        return json.loads((run_dir / "config.json").read_text()).get("started_from")
    except (OSError, ValueError):
        return None


def _trim_log(path: Path, step: int) -> None:
    """Drop the log lines of steps after `step` (a crashed run logged steps its last.pt does not
    hold), and a last line that the crash cut short."""
    if not path.exists():
        return
    lines = path.read_text().splitlines(keepends=True)
    kept = []
    for line in lines:
        try:
            logged = json.loads(line)["step"]
        except (ValueError, KeyError):
            continue
        if logged <= step and line.endswith("\n"):
            kept.append(line)
    if len(kept) != len(lines):
        path.write_text("".join(kept))


class _ProgressBar:
    """A run's progress bar, measured in what bounds the run: its time budget when it has one
    (the bar then ends when time is up, and shows the time left), else its steps, else its
    epochs. Bytes/s, bpb and the step go in the text after the bar."""

    def __init__(self, trainer: "Trainer", disable: bool):
        config = trainer.config
        if config.minutes is not None:
            self.measure, total = "time", 60 * config.minutes
        elif config.steps is not None:
            self.measure, total = "step", config.steps
        else:
            self.measure, total = "epoch", config.epochs
        self.total, self.name = total, config.model
        # The text after the bar is the description: tqdm's own postfix field starts with ", ".
        self.bar = tqdm(total=total, initial=self._at(trainer), desc=config.model, dynamic_ncols=True, disable=disable,
                        bar_format="{percentage:3.0f}%|{bar}| {desc}")

    def _at(self, trainer: "Trainer") -> float:
        position = {"time": trainer.progress.elapsed, "step": trainer.progress.step, "epoch": trainer.epochs_done}[self.measure]
        return min(position, self.total)

    def update(self, trainer: "Trainer", text: str) -> None:
        if self.measure == "time":
            left = f"{format_duration(max(self.total - trainer.progress.elapsed, 0))} left"
        elif self.measure == "step":
            left = f"step {trainer.progress.step:,}/{self.total:,}"
        else:
            left = f"epoch {trainer.epochs_done:.3f}/{self.total:g}"
        self.bar.set_description_str(f"{self.name} | {text} | {left}", refresh=False)
        self.bar.update(self._at(trainer) - self.bar.n)

    def close(self) -> None:
        self.bar.close()


def format_duration(seconds: float) -> str:
    """A duration for people: ``0.4 s``, ``42 s``, ``2 min 13 s``, ``1 h 05 min``."""
    if seconds < 0:
        raise ValueError(f"a duration cannot be negative, got {seconds}")
    if seconds < 10:
        return f"{seconds:.1f} s"
    whole = int(round(seconds))
    if whole < 60:
        return f"{whole} s"
    if whole < 3600:
        return f"{whole // 60} min {whole % 60} s"
    return f"{whole // 3600} h {whole % 3600 // 60:02d} min"


def _postfix(metrics: dict, valid_bpb: float | None, rate: float) -> str:
    parts = ["skipped (non-finite)" if metrics.get("skipped") else f"loss {metrics['loss']:.3f} bpb {metrics['bpb']:.3f}"]
    if valid_bpb is not None:
        parts.append(f"valid {valid_bpb:.3f}")
    parts.append(f"{rate:,.0f} B/s")
    return " | ".join(parts)


def format_summary(summary: dict) -> str:
    """The end-of-run report, a few human-readable lines."""
    minutes, seconds = divmod(summary["seconds"], 60)
    lines = [
        f"done: {summary['steps']:,} steps, {summary['bytes']:,} bytes in {int(minutes)}m{seconds:04.1f}s "
        f"({summary['bytes_per_second']:,.0f} training bytes/s)",
        f"valid bpb {summary['valid_bpb']:.4f} on {summary['valid_bytes']:,} bytes | test bpb "
        f"{summary['test_bpb']:.4f} on {summary['test_bytes']:,} bytes ({summary['data']}, weights of step "
        f"{summary['tested_step']:,})",
        f"run dir: {summary['run_dir']}",
    ]
    if summary["nonfinite_steps"]:
        lines.insert(1, f"skipped {summary['nonfinite_steps']} non-finite steps")
    return "\n".join(lines)
