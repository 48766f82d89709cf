"""Training SHA-RNN, SHAQ and the LSTM baseline on enwik8 (or the offline stand-in).

The procedure is the reference's (Merity 2019, main.py):

- the training bytes are laid out as `batch_size` long rows (`batchify`), and every step reads
  the next segment of all rows, left to right, with no shuffling;
- the recurrent state and the attention memory of one segment are carried into the next and
  detached in between (truncated backpropagation through time); a new epoch starts cold;
- the segment length varies around `seq_len` if asked (`shaq.data.segment_length`);
- LAMB with minimum trust (or Adam), linear warmup then a constant rate or a linear decay to 0,
  gradient clipping;
- validation in bits per byte (`shaq.evaluate`) from time to time, and at the end a test
  evaluation of the best-validated weights.

A run lives in a folder (`shaq.run_folder`) that one process at a time writes; `Trainer.resume`
continues it exactly where its last.pt left off. SIGINT and SIGTERM stop `fit()` after the step
in progress with last.pt saved: fit raises TrainingInterrupted, and `python -m shaq train`
exits with 130 or 143.

    trainer = Trainer(TrainConfig.cpu(minutes=3), SHARNNConfig.cpu())
    summary = trainer.fit()

Under `torchrun --nproc_per_node N` the same code runs data-parallel: each process takes its
share of the rows, DistributedDataParallel averages the gradients, metrics are summed over the
processes, and only rank 0 writes files and shows progress.
"""

import json
import math
import random
import signal
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import shaq
from shaq.byte_lm import ModelConfig, State
from shaq.checkpoint import Progress, load_checkpoint, load_weights
from shaq.console import ProgressBar, format_header, format_summary, step_text
from shaq.data import batchify, get_segment, segment_length
from shaq.device import (
    all_reduce_sum,
    autocast_dtype,
    init_distributed,
    mixed_precision,
    resolve_amp,
)
from shaq.evaluate import (
    LN2,
    NonFiniteError,  # noqa: F401  (importable with the trainer's other errors)
    bits_per_byte,
)
from shaq.models import build_model, detach, model_class
from shaq.optim import linear_warmup, make_optimizer
from shaq.parallel import from_main, load_corpus, share
from shaq.run_folder import (
    StopSignals,
    TrainingInterrupted,
    check_run_folder,
    new_run_path,
    open_run_folder,
)
from shaq.runlock import RunLock
from shaq.train_checkpoints import RunCheckpoints, TrainingError
from shaq.train_config import TrainConfig

# ----------------------------------------------------------------------------- the trainer


class Trainer(RunCheckpoints):
    """Trains one model as `config` says; `fit()` runs it, `Trainer.resume(folder)` continues one.

    Args:
        config: the training settings.
        model_config: the shape of the model `config.model` names, in that model's config class
            (`SHARNNConfig.cpu()` for 'sharnn' and 'shaq', `LSTMConfig.cpu()` for 'lstm', or
            `shaq.models.model_config(name, preset)`).
        callback: called on rank 0 after every step with that step's metrics dict (the line
            written to metrics.jsonl: step, time, bytes, loss, bpb, lr, grad_norm, seq_len, and
            valid_bpb and valid_seconds on validation steps), e.g. to draw a live plot in a
            notebook.
        verbose: print the header, a progress bar and the summary (rank 0 only).

    Attributes: `model` (the raw module, whose weights are saved), `run_dir`, `corpus`, and
    `progress` (where the run stands: step, epoch, bytes, ...). After `fit()` the model holds the
    weights it tested: those of the best validation.

    Under torchrun the process group is joined here and left to the caller to destroy.
    """

    def __init__(
        self,
        config: TrainConfig,
        model_config: ModelConfig,
        *,
        callback: Callable[[dict], None] | None = None,
        verbose: bool = True,
        _checkpoint: dict | None = None,
        _source: dict | None = None,
    ):
        self.callback, self.verbose = callback, verbose
        model_class(config.model).check_config(model_config)  # before any work
        self.dist, self.device = init_distributed(config.device)
        world = self.dist.world_size
        if config.batch_size % world:
            raise ValueError(
                f"batch_size {config.batch_size} does not split over {world} processes; use a "
                f"multiple of {world}"
            )
        if self.dist.is_main and config.out_dir is not None:
            check_run_folder(config.out_dir, resuming=_checkpoint is not None)  # before any work
        # Record what 'auto' or 'on' chose, so a resumed run computes as this one did.
        config = replace(config, amp=resolve_amp(config.amp, self.device))
        self.amp_dtype = autocast_dtype(config.amp)
        if self.device.type == "cuda":
            torch.set_float32_matmul_precision("high")  # TF32 where autocast leaves float32

        self.corpus = load_corpus(config.data, config.data_root, self.dist, verbose)
        # Record what 'auto' chose, so a resumed run and the saved config name the real data.
        self.config = config = replace(
            config, data="enwik8" if self.corpus.name == "enwik8" else "standin"
        )
        # This process's rows of the global batch; all processes walk their rows in lockstep.
        rows = share(batchify(self.corpus.train[: config.max_bytes], config.batch_size), self.dist)
        self.train_data = rows.to(self.device)  # [B / world, N]
        self.valid_data = self._eval_rows(
            self.corpus.valid, config.eval_bytes, config.eval_batch_size
        )

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

        self.optimizer = make_optimizer(
            config.optimizer,
            self.model.parameters(),
            config.lr,
            config.weight_decay,
            config.min_trust,
        )
        self.scheduler = linear_warmup(self.optimizer, config.warmup)
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
        self._signals = StopSignals()  # SIGINT and SIGTERM, caught during fit()
        self._stop_agreed = False  # whether any process had caught one at the last all-reduce
        self._lock: RunLock | None = None
        try:
            self.run_dir = self._setup_run_dir(_checkpoint)  # takes the lock
            if _checkpoint is not None:
                self._restore(_checkpoint)
        except BaseException:
            self.close()  # a Trainer that failed to start must not keep its folder locked
            raise

    # ------------------------------------------------------------------------- setup helpers

    def _eval_rows(
        self, split: torch.Tensor, max_bytes: int | None, batch_size: int
    ) -> torch.Tensor:
        """This process's share of the rows of an evaluation split, on the device."""
        return share(batchify(split[:max_bytes], batch_size), self.dist).to(self.device)

    def _setup_run_dir(self, checkpoint: dict | None) -> Path:
        """Open (rank 0) the run folder, holding it until fit() ends, and write config.json; every
        process learns its path."""
        path = None
        if self.dist.is_main:
            path = (
                Path(self.config.out_dir)
                if self.config.out_dir is not None
                else new_run_path(self.config.model)
            )
            record = {
                "shaq_version": shaq.__version__,
                "model": self.config.model,
                "model_config": self.model_config.to_dict(),
                "train_config": self.config.to_dict(),
                "started_from": self.started_from,
            }
            self._lock = open_run_folder(
                path, record, resume_step=None if checkpoint is None else checkpoint["step"]
            )
        path = from_main(path, self.dist)
        self.config = replace(self.config, out_dir=str(path))
        return path

    # ------------------------------------------------------------------------- the loop

    def _train_step(self) -> dict:
        """One segment: forward, backward, clip, step. Returns the step's metrics."""
        config = self.config
        if self._epoch_ended():  # the last step read the end of the data: a new epoch starts cold
            self.progress.cursor, self.carried = 0, None
            self.progress.epoch += 1
        before = self._position()  # the last good state, should this step turn out non-finite
        start = time.perf_counter()
        length = segment_length(config.seq_len, config.variable_seq_len, self.data_rng)
        inputs, targets = get_segment(self.train_data, self.progress.cursor, length)  # [B/world, T]
        with mixed_precision(self.device, self.amp_dtype):
            out = self.forward_model(inputs, state=self.carried, targets=targets)
        self.scaler.scale(out.loss).backward()  # DDP averages the gradients over processes here
        self.scaler.unscale_(self.optimizer)
        grad_norm = nn.utils.clip_grad_norm_(
            self.model.parameters(), config.clip if config.clip > 0 else math.inf
        )
        # One collective per step: the summed losses and whether any process ran out of time or
        # caught a stop signal (all must stop at the same step, or the others would wait forever).
        self.progress.elapsed = time.perf_counter() - self._started
        time_up = config.minutes is not None and self.progress.elapsed >= 60 * config.minutes
        flags = torch.tensor(
            [float(time_up), float(self._signals.caught is not None), self.progress.elapsed],
            device=self.device,
        )
        totals = all_reduce_sum(
            torch.cat([out.loss.detach().float().view(1), flags]), self.dist
        ).tolist()
        loss, grad_norm = totals[0] / self.dist.world_size, grad_norm.item()
        if config.decay == "linear":  # every process decays by the same (mean) elapsed time
            left = max(0.0, 1.0 - self._budget_used(totals[3] / self.dist.world_size))
            rates = self.scheduler.get_last_lr()  # the warmup's
            for group, rate in zip(self.optimizer.param_groups, rates, strict=True):
                group["lr"] = rate * left
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
                    f"non-finite loss at step {self.progress.step + 1} (loss {loss}, grad norm "
                    f"{grad_norm}); stopped. {self.run_dir / 'last.pt'} holds the state before it. "
                    "Start a new run with a lower --lr or --clip, or resume with --resume "
                    f"{self.run_dir} --on-nonfinite skip"
                )
            self.progress.nonfinite_steps += 1
            self.carried = None  # the state may be poisoned too: restart it
        self.progress.cursor += inputs.size(1)
        self.progress.step += 1
        self.progress.bytes += inputs.size(1) * config.batch_size
        self.progress.train_seconds += time.perf_counter() - start
        self.time_up, self._stop_agreed = totals[1] > 0, totals[2] > 0
        metrics = {
            "step": self.progress.step,
            "time": round(self.progress.elapsed, 3),
            "bytes": self.progress.bytes,
            "loss": loss if finite else None,
            "bpb": loss / LN2 if finite else None,
            "lr": lr,
            "grad_norm": grad_norm if math.isfinite(grad_norm) else None,
            "seq_len": inputs.size(1),
        }
        if not finite:
            metrics["skipped"] = True
        return metrics

    def _bpb(self, rows: torch.Tensor) -> float:
        """Bits per byte over every process's rows."""
        return bits_per_byte(self.model, rows, self.config.seq_len, self.amp_dtype, self.dist)

    def _budget_used(self, elapsed: float) -> float:
        """The fraction of the run's budget used before this step: the largest of its steps,
        epochs and minutes that are set (TrainConfig.decay)."""
        config, used = self.config, [0.0]
        if config.steps is not None:
            used.append(self.progress.step / config.steps)
        if config.epochs is not None:
            used.append(self.epochs_done / config.epochs)
        if config.minutes is not None:
            used.append(elapsed / (60 * config.minutes))
        return max(used)

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
        return (
            self.time_up
            or (config.steps is not None and self.progress.step >= config.steps)
            or (config.epochs is not None and self.epochs_done >= config.epochs)
        )

    def _bounds(self) -> dict[str, float]:
        """Where the run stands in each measure that may bound it (for the progress bar)."""
        return {
            "time": self.progress.elapsed,
            "step": self.progress.step,
            "epoch": self.epochs_done,
        }

    def fit(self) -> dict:
        """Train until `epochs`, `steps` or `minutes`, validate, test the best weights; return the
        summary.

        Summary keys: model, data, params, steps, bytes, seconds, bytes_per_second (training
        steps only), valid_bpb and test_bpb (of the weights of tested_step, the best
        validation, on the first valid_bytes / test_bytes of each split), nonfinite_steps,
        run_dir. Also written to summary.json.

        SIGINT and SIGTERM end training after the step in progress (`shaq.run_folder.StopSignals`):
        last.pt is saved and fit raises TrainingInterrupted (a KeyboardInterrupt) instead of
        testing. When fit returns or raises, the signals have their previous handlers back and the
        run folder is released, so that Trainer.resume of it may follow in the same process.

        A validation during training that is not finite is logged and never becomes the best;
        a non-finite final valid or test bpb raises TrainingError (there is no result to
        report). TrainingError also comes from a non-finite training loss with
        on_nonfinite='stop' and from a checkpoint that cannot be written.
        """
        if self.dist.is_main and self._lock is None:  # an earlier fit() let the folder go
            self._lock = RunLock(self.run_dir)
        self._signals, self._stop_agreed = StopSignals(), False
        try:
            return self._fit()
        finally:
            self._signals.restore()
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
            world = f" x {self.dist.world_size} processes" if self.dist.enabled else ""
            print(
                format_header(
                    config,
                    self.n_params,
                    self.corpus.name,
                    self.train_data.numel() * self.dist.world_size,
                    f"{self.device}{world}",
                    self.amp_dtype,
                    self.run_dir,
                )
            )
        log = open(self.run_dir / "metrics.jsonl", "a") if main else None
        bar = ProgressBar(config, self._bounds(), disable=not (self.verbose and main))
        # For this session's rate:
        bytes_before, seconds_before = self.progress.bytes, self.progress.train_seconds
        valid_bpb = None
        self.model.train()
        # The clock goes on from a resumed run's time.
        self._started = time.perf_counter() - self.progress.elapsed
        self._signals.catch()
        try:
            while not self._done() and not self._stop_requested():
                metrics = self._train_step()
                if (
                    (config.eval_interval and self.progress.step % config.eval_interval == 0)
                    or (config.eval_each_epoch and self._epoch_ended())
                    or self._done()
                ):
                    started = time.perf_counter()
                    valid_bpb = metrics["valid_bpb"] = self._validate()
                    metrics["valid_seconds"] = round(time.perf_counter() - started, 3)
                if (
                    config.save_interval
                    and self.progress.step % config.save_interval == 0
                    and not self._done()
                ):
                    self._save("last.pt")
                if main:
                    log.write(json.dumps(metrics) + "\n")
                    log.flush()
                    if self.callback is not None:
                        self.callback(metrics)
                rate = (self.progress.bytes - bytes_before) / max(
                    self.progress.train_seconds - seconds_before, 1e-9
                )
                bar.update(step_text(metrics, valid_bpb, rate), self._bounds())
        finally:
            bar.close()
            if log is not None:
                log.close()
        self.progress.elapsed = time.perf_counter() - self._started
        self._save("last.pt")
        self._signals.restore()  # a signal during the test interrupts it as usual: last.pt is saved
        if self._stop_requested():
            # Under torchrun a process may stop for another's signal: it reports SIGTERM, a job's
            # usual stop.
            raise TrainingInterrupted(
                self._signals.caught or signal.SIGTERM, self.progress.step, self.run_dir
            )
        if self._signals.caught is not None:  # caught after all last agreed to go on: deliver it
            signal.raise_signal(self._signals.caught)
        summary = self._final_evaluation()
        if self.verbose and main:
            print(format_summary(summary))
        return summary

    def _stop_requested(self) -> bool:
        """Whether a signal asks to stop: as all processes agreed at the last step's all-reduce, or,
        in a single process, as soon as it is caught (one that comes during a validation stops
        the run before the next step)."""
        return self._stop_agreed if self.dist.enabled else self._signals.caught is not None

    def _validate(self) -> float:
        """Validation bpb now; a new best is saved as best.pt. A non-finite one is returned (and
        logged) as it is, and never becomes the best."""
        bpb = self._bpb(self.valid_data)
        if math.isfinite(bpb) and (
            self.progress.best_valid_bpb is None or bpb < self.progress.best_valid_bpb
        ):
            self.progress.best_valid_bpb, self.progress.best_step = bpb, self.progress.step
            self._save("best.pt")
        return bpb

    def _final_evaluation(self) -> dict:
        """Test the best-validated weights (the reference's protocol) and build the summary."""
        config = self.config
        tested_step = self.progress.step
        if (
            self.progress.best_valid_bpb is not None
            and self.progress.best_step != self.progress.step
        ):
            if self.dist.enabled:
                dist.barrier()  # best.pt is written by rank 0
            load_weights(self.model, load_checkpoint(self.run_dir / "best.pt"))
            tested_step = self.progress.best_step
        if config.final_bytes == config.eval_bytes and self.progress.best_valid_bpb is not None:
            valid_bpb = self.progress.best_valid_bpb  # the same measurement of the same weights
        else:
            valid_bpb = self._bpb(
                self._eval_rows(self.corpus.valid, config.final_bytes, config.eval_batch_size)
            )
        test_bpb = self._bpb(
            self._eval_rows(self.corpus.test, config.final_bytes, config.test_batch_size)
        )
        for split, bpb in (("valid", valid_bpb), ("test", test_bpb)):
            if not math.isfinite(bpb):
                raise TrainingError(
                    f"the weights of step {tested_step:,} give a non-finite {split} loss ({bpb} "
                    f"bpb): they diverged, so there is no result to report ({self.run_dir} keeps "
                    "the checkpoints). Retrain with a lower --lr or --clip"
                )
        summary = {
            "model": config.model,
            "data": self.corpus.name,
            "params": self.n_params,
            "steps": self.progress.step,
            "bytes": self.progress.bytes,
            "seconds": round(self.progress.elapsed, 3),
            "bytes_per_second": self.progress.bytes / self.progress.train_seconds
            if self.progress.train_seconds
            else 0.0,
            "valid_bpb": valid_bpb,
            "test_bpb": test_bpb,
            "tested_step": tested_step,
            "valid_bytes": self.corpus.valid[: config.final_bytes].numel(),
            "test_bytes": self.corpus.test[: config.final_bytes].numel(),
            "nonfinite_steps": self.progress.nonfinite_steps,
            "run_dir": str(self.run_dir),
        }
        if self.dist.is_main:
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        return summary
