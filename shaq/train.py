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

    trainer = Trainer(TrainConfig.cpu(minutes=3), SHARNNConfig.cpu())
    summary = trainer.fit()

Under `torchrun --nproc_per_node N` the same code runs data-parallel: each process takes its
share of the rows, DistributedDataParallel averages the gradients, metrics are summed over the
processes, and only rank 0 writes files and shows progress.
"""

import contextlib
import json
import math
import random
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
    CheckpointError, check_model, load_checkpoint, load_weights, remove_temp_files, rng_state,
    save_checkpoint, set_rng_state, state_from_dict, state_to_dict,
)
from shaq.data import Corpus, DataError, batchify, get_segment, load_enwik8, load_standin, segment_length
from shaq.device import DEVICES, Distributed, all_reduce_sum, autocast_dtype, init_distributed
from shaq.models import MODELS, SHARNNConfig, State, build_model, detach
from shaq.optim import LAMB

LN2 = math.log(2)


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss); the message names the step and the checkpoint to use."""


# ----------------------------------------------------------------------------- config


@dataclass
class TrainConfig:
    """How to train: data, batches, optimisation, evaluation, where to write. Presets: `smoke()`,
    `cpu()`, `paper()`. The defaults are the reference's first pass (README command + main.py).

    Sizes are in bytes (= tokens) unless named otherwise. A run stops after `steps` steps or
    `minutes` of wall-clock time, whichever comes first (validations count, the final
    evaluation does not).
    """

    model: str = "shaq"  # 'shaq', 'sharnn' or 'lstm'
    data: str = "auto"  # 'enwik8', 'standin', or 'auto': enwik8 if obtainable, else the stand-in
    data_root: str = "data"  # where enwik8.zip / enwik8 are looked for and downloaded to
    max_bytes: int | None = None  # train on this prefix of the training split only
    batch_size: int = 16  # parallel rows, over all processes
    seq_len: int = 1024  # segment length (BPTT), also used for evaluation
    variable_seq_len: bool = True  # vary the training segment length as the reference did
    steps: int | None = 175_776  # 32 epochs of enwik8's 90M training bytes in 16 x 1024 segments
    minutes: float | None = None
    optimizer: str = "lamb"  # 'lamb' (LAMB with minimum trust) or 'adam'
    lr: float = 2e-3
    warmup: int = 800  # steps of linear warmup, then a constant rate
    weight_decay: float = 1.2e-6
    min_trust: float = 0.25  # LAMB's floor of the trust ratio
    clip: float = 0.25  # max global gradient norm; 0 = no clipping
    eval_interval: int = 2000  # steps between validations; 0 = only at the end
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
        need(self.steps is not None or self.minutes is not None, "set steps or minutes (or both) to say when to stop")
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
        """The reference's first pass: LAMB 2e-3, warmup 800, batch 16 x 1024 (variable), 32 epochs."""
        return cls(**overrides)

    @classmethod
    def cpu(cls, **overrides) -> "TrainConfig":
        """Ten minutes on 2 CPU cores with SHARNNConfig.cpu(): batch 16 x 256, a short warmup, and
        a final evaluation on at most 1 MB of valid and test (all of the stand-in's)."""
        return replace(cls(seq_len=256, steps=None, minutes=10, warmup=100, eval_interval=200,
                           eval_bytes=131_072, final_bytes=1_000_000, save_interval=200), **overrides)

    @classmethod
    def smoke(cls, **overrides) -> "TrainConfig":
        """Seconds, for tests and CI: 20 steps of 4 x 32 on a 100 kB prefix of the stand-in."""
        return replace(cls(data="standin", max_bytes=100_000, batch_size=4, seq_len=32, variable_seq_len=False,
                           steps=20, warmup=5, eval_interval=10, eval_bytes=4096, eval_batch_size=4,
                           test_batch_size=4, final_bytes=8192, save_interval=10), **overrides)

    @classmethod
    def preset(cls, name: str, **overrides) -> "TrainConfig":
        """A preset by name: 'paper', 'cpu' or 'smoke'."""
        presets = {"paper": cls.paper, "cpu": cls.cpu, "smoke": cls.smoke}
        if name not in presets:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(presets)}")
        return presets[name](**overrides)

    def to_dict(self) -> dict:
        return asdict(self)


# Settings a resumed run may change: how long it runs and how it reports, not what it computes.
RESUMABLE = frozenset({"steps", "minutes", "eval_interval", "save_interval", "final_bytes", "device", "amp",
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
    """
    device = next(model.parameters()).device
    columns = batchify(data[:max_bytes], batch_size).to(device)
    nats, count = _sum_nats(model, columns, bptt, amp_dtype)
    return nats / count / LN2


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

    Attributes: `model` (the raw module, whose weights are saved), `run_dir`, `corpus`, and the
    counters `step`, `bytes_seen`. After `fit()` the model holds the weights it tested: those
    of the best validation.

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
    ):
        self.callback, self.verbose = callback, verbose
        self.dist, self.device = init_distributed(config.device)
        world = self.dist.world_size
        if config.batch_size % world:
            raise ValueError(f"batch_size {config.batch_size} does not split over {world} processes; use a multiple of {world}")
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

        self.step = self.epoch = self.cursor = self.bytes_seen = self.nonfinite_steps = 0
        self.carried: State | None = None
        self.elapsed = self.train_seconds = 0.0  # wall-clock of the run, and of its steps alone
        self.best_valid_bpb: float | None = None
        self.best_step = 0
        self.time_up = False
        self.run_dir = self._setup_run_dir(_checkpoint)
        if _checkpoint is not None:
            self._restore(_checkpoint)

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
        `model_overrides` entry that differs from the checkpoint raises CheckpointError.
        """
        path = Path(path)
        file = path / "last.pt" if path.is_dir() else path
        checkpoint = load_checkpoint(file)
        saved = checkpoint["train_config"]
        problems = [f"{key} {saved.get(key)!r} (checkpoint) vs {value!r}" for key, value in overrides.items()
                    if key not in RESUMABLE and saved.get(key) != value]
        problems += [f"{key} {checkpoint['model_config'].get(key)!r} (checkpoint) vs {value!r}"
                     for key, value in (model_overrides or {}).items() if checkpoint["model_config"].get(key) != value]
        if problems:
            raise CheckpointError(
                "a resumed run keeps its model and training settings (only "
                f"{', '.join(sorted(RESUMABLE))} may change); differs: " + "; ".join(problems))
        try:
            config = TrainConfig(**{**saved, **overrides, "out_dir": str(file.parent)})
            model_config = SHARNNConfig(**checkpoint["model_config"])
        except TypeError as err:
            raise CheckpointError(f"{file} holds settings this shaq does not know: {err}") from err
        return cls(config, model_config, callback=callback, verbose=verbose, _checkpoint=checkpoint)

    # ------------------------------------------------------------------------- setup helpers

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
                if checkpoint is None and (path / "last.pt").exists():
                    raise ValueError(f"{path} already holds a run: continue it with --resume {path} or choose another --out")
            else:
                stem = Path("runs") / f"{self.config.model}-{time.strftime('%Y%m%d-%H%M%S')}"
                path, n = stem, 1
                while path.exists():
                    n += 1
                    path = stem.with_name(f"{stem.name}-{n}")
            path.mkdir(parents=True, exist_ok=True)
            remove_temp_files(path)
            config = {"shaq_version": shaq.__version__, "model": self.config.model,
                      "model_config": self.model_config.to_dict(), "train_config": self.config.to_dict()}
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
            state = State(rnn=[type(layer)(*(t.chunk(world)[rank] for t in layer)) for layer in state.rnn],
                          memory=[m.chunk(world)[rank] if m is not None else None for m in state.memory])
        self.carried = state
        self.step, self.epoch, self.cursor = checkpoint["step"], checkpoint["epoch"], checkpoint["cursor"]
        self.bytes_seen, self.nonfinite_steps = checkpoint["bytes"], checkpoint["nonfinite_steps"]
        self.elapsed, self.train_seconds = checkpoint["elapsed"], checkpoint["train_seconds"]
        self.best_valid_bpb, self.best_step = checkpoint["best_valid_bpb"], checkpoint["best_step"]

    # ------------------------------------------------------------------------- checkpoints

    def _position(self) -> dict:
        """Where the run stands between two steps: everything in a checkpoint but the state dicts."""
        return {
            "rng": rng_state(self.device), "data_rng": self.data_rng.get_state(), "cursor": self.cursor,
            "epoch": self.epoch, "state": self.carried, "step": self.step, "bytes": self.bytes_seen,
            "elapsed": self.elapsed, "train_seconds": self.train_seconds, "best_valid_bpb": self.best_valid_bpb,
            "best_step": self.best_step, "nonfinite_steps": self.nonfinite_steps,
        }

    def _save(self, name: str, position: dict | None = None) -> None:
        """Save a checkpoint of `position` (default: now) as run_dir/name. Every process must call
        it (the carried states and RNG states are gathered); rank 0 writes."""
        position = position if position is not None else self._position()
        state, rngs = position["state"], [position["rng"]]
        if self.dist.enabled:
            state = _gather_state(state, self.dist.world_size)
            rngs = [None] * self.dist.world_size
            dist.all_gather_object(rngs, position["rng"])
        if not self.dist.is_main:
            return
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

    # ------------------------------------------------------------------------- the loop

    def _train_step(self) -> dict:
        """One segment: forward, backward, clip, step. Returns the step's metrics."""
        config = self.config
        if self.cursor >= self.train_data.size(1) - 1:  # end of the data: a new epoch starts cold
            self.cursor, self.epoch, self.carried = 0, self.epoch + 1, None
        before = self._position()  # the last good state, should this step turn out non-finite
        start = time.perf_counter()
        length = segment_length(config.seq_len, config.variable_seq_len, self.data_rng)
        inputs, targets = get_segment(self.train_data, self.cursor, length)  # [B / world, T]
        with _autocast(self.device, self.amp_dtype):
            out = self.forward_model(inputs, state=self.carried, targets=targets)
        self.scaler.scale(out.loss).backward()  # DDP averages the gradients over processes here
        self.scaler.unscale_(self.optimizer)
        grad_norm = nn.utils.clip_grad_norm_(self.model.parameters(), config.clip if config.clip > 0 else math.inf)
        # One collective per step: the summed losses and whether any process ran out of time
        # (all must stop at the same step, or the others would wait forever).
        self.elapsed = time.perf_counter() - self._started
        time_up = config.minutes is not None and self.elapsed >= 60 * config.minutes
        totals = all_reduce_sum(torch.stack([out.loss.detach().float(), torch.tensor(float(time_up), device=self.device)]),
                                self.dist).tolist()
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
                    f"non-finite loss at step {self.step + 1} (loss {loss}, grad norm {grad_norm}); stopped. "
                    f"{self.run_dir / 'last.pt'} holds the state before it. Start a new run with a lower "
                    f"--lr or --clip, or resume with --resume {self.run_dir} --on-nonfinite skip")
            self.nonfinite_steps += 1
            self.carried = None  # the state may be poisoned too: restart it
        self.cursor += inputs.size(1)
        self.step += 1
        self.bytes_seen += inputs.size(1) * config.batch_size
        self.train_seconds += time.perf_counter() - start
        self.time_up = totals[1] > 0
        metrics = {"step": self.step, "time": round(self.elapsed, 3), "bytes": self.bytes_seen,
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

    def _done(self) -> bool:
        return self.time_up or (self.config.steps is not None and self.step >= self.config.steps)

    def fit(self) -> dict:
        """Train until `steps` or `minutes`, validate, test the best weights; return the summary.

        Summary keys: model, data, params, steps, bytes, seconds, bytes_per_second (training
        steps only), valid_bpb and test_bpb (of the weights of tested_step, the best
        validation, on the first valid_bytes / test_bytes of each split), nonfinite_steps,
        run_dir. Also written to summary.json.
        Raises TrainingError on a non-finite loss with on_nonfinite='stop'.
        """
        config, main = self.config, self.dist.is_main
        if self.verbose and main:
            print(self._header())
        log = open(self.run_dir / "metrics.jsonl", "a") if main else None
        bar = tqdm(total=config.steps, initial=self.step, desc=config.model, unit="step", dynamic_ncols=True,
                   disable=not (self.verbose and main))
        bytes_before, seconds_before, valid_bpb = self.bytes_seen, self.train_seconds, None  # for this session's rate
        self.model.train()
        self._started = time.perf_counter() - self.elapsed  # the clock goes on from a resumed run's time
        try:
            while not self._done():
                metrics = self._train_step()
                if (config.eval_interval and self.step % config.eval_interval == 0) or self._done():
                    valid_bpb = metrics["valid_bpb"] = self._validate()
                if config.save_interval and self.step % config.save_interval == 0 and not self._done():
                    self._save("last.pt")
                if main:
                    log.write(json.dumps(metrics) + "\n")
                    log.flush()
                    if self.callback is not None:
                        self.callback(metrics)
                bar.update(1)
                rate = (self.bytes_seen - bytes_before) / max(self.train_seconds - seconds_before, 1e-9)
                bar.set_postfix_str(_postfix(metrics, valid_bpb, rate), refresh=False)
        finally:
            bar.close()
            if log is not None:
                log.close()
        self.elapsed = time.perf_counter() - self._started
        self._save("last.pt")
        summary = self._final_evaluation()
        if self.verbose and main:
            print(format_summary(summary))
        return summary

    def _validate(self) -> float:
        """Validation bpb now; a new best is saved as best.pt."""
        bpb = self._bpb(self.valid_data)
        if math.isfinite(bpb) and (self.best_valid_bpb is None or bpb < self.best_valid_bpb):
            self.best_valid_bpb, self.best_step = bpb, self.step
            self._save("best.pt")
        return bpb

    def _final_evaluation(self) -> dict:
        """Test the best-validated weights (the reference's protocol) and build the summary."""
        config = self.config
        tested_step = self.step
        if self.best_valid_bpb is not None and self.best_step != self.step:
            if self.dist.enabled:
                dist.barrier()  # best.pt is written by rank 0
            load_weights(self.model, load_checkpoint(self.run_dir / "best.pt"))
            tested_step = self.best_step
        if config.final_bytes == config.eval_bytes and self.best_valid_bpb is not None:
            valid_bpb = self.best_valid_bpb  # the same measurement of the same weights
        else:
            valid_bpb = self._bpb(self._eval_rows(self.corpus.valid, config.final_bytes, config.eval_batch_size))
        test_bpb = self._bpb(self._eval_rows(self.corpus.test, config.final_bytes, config.test_batch_size))
        summary = {
            "model": config.model, "data": self.corpus.name, "params": self.n_params, "steps": self.step,
            "bytes": self.bytes_seen, "seconds": round(self.elapsed, 3),
            "bytes_per_second": self.bytes_seen / self.train_seconds if self.train_seconds else 0.0,
            "valid_bpb": valid_bpb, "test_bpb": test_bpb, "tested_step": tested_step,
            "valid_bytes": self.corpus.valid[: config.final_bytes].numel(),
            "test_bytes": self.corpus.test[: config.final_bytes].numel(),
            "nonfinite_steps": self.nonfinite_steps, "run_dir": str(self.run_dir),
        }
        if self.dist.is_main:
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        return summary

    def _header(self) -> str:
        config = self.config
        precision = {None: "float32", torch.bfloat16: "bf16 autocast", torch.float16: "fp16 autocast + scaler"}
        world = f" x {self.dist.world_size} processes" if self.dist.enabled else ""
        until = " or ".join(part for part in (f"{config.steps:,} steps" if config.steps else "",
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

    return State(rnn=[type(layer)(*map(gather, layer)) for layer in state.rnn],
                 memory=[gather(m) if m is not None else None for m in state.memory])


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
