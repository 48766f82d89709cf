"""The Trainer's checkpoint half: what a run saves, how it continues from a save, and how a new
run starts from another's weights.

`RunCheckpoints` is a base of `shaq.train.Trainer` and reads the attributes the Trainer builds
(model, optimizer, scheduler, scaler, data_rng, progress, carried, dist, device, run_dir,
config, model_config). A checkpoint holds the state dicts, the configs, and the position
(`_position`): the RNG states, the carried recurrent state and the run's `Progress`; its keys
are `shaq.checkpoint.KEYS`.
"""

import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from shaq.checkpoint import (
    CheckpointError,
    Progress,
    check_model,
    find_checkpoint,
    load_checkpoint,
    load_weights,
    rng_state,
    save_checkpoint,
    set_rng_state,
    state_from_dict,
    state_to_dict,
)
from shaq.parallel import from_main, gather_objects, gather_state, share
from shaq.runlock import check_not_locked
from shaq.train_config import resume_configs, start_from_configs

if TYPE_CHECKING:
    from shaq.train import Trainer


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss, a checkpoint that cannot be written, weights
    that test non-finite); the message names the step and what to do."""


class RunCheckpoints:
    """Saving, restoring and starting from checkpoints, for `shaq.train.Trainer`."""

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
        config, model_config = resume_configs(file, checkpoint, overrides, model_overrides or {})
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
        config, model_config = start_from_configs(file, source, overrides)
        return cls(config, model_config, callback=callback, verbose=verbose, _source=source)

    def _load_initial_weights(self, path: str, source: dict | None) -> dict:
        """Load the weights of the checkpoint at `path` (already read: `source`) into the model;
        return what config.json records of where the run started."""
        file = find_checkpoint(path)
        source = source if source is not None else load_checkpoint(file)
        check_model(source, self.config.model, self.model_config)
        load_weights(self.model, source)
        return {
            "checkpoint": str(file.resolve()),
            "model": source["model_name"],
            "step": source["step"],
            "best_valid_bpb": source["best_valid_bpb"],
            "data": source["train_config"].get("data"),
        }

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
        state = state_from_dict(checkpoint["state"], self.device)  # the global batch's
        self.carried = None if state is None else state.map(lambda t: share(t, self.dist))
        self.progress = Progress.from_dict(checkpoint)

    def _position(self) -> dict:
        """Where the run stands between two steps (a copy): everything in a checkpoint but the
        state dicts."""
        return {
            "rng": rng_state(self.device),
            "data_rng": self.data_rng.get_state(),
            "state": self.carried,
            **self.progress.to_dict(),
        }

    def _save(self, name: str, position: dict | None = None) -> None:
        """Save a checkpoint of `position` (default: now) as run_dir/name. Every process must call
        it (the carried states and RNG states are gathered); rank 0 writes. A write that fails
        (a full disk) raises TrainingError in every process: the run cannot go on unsaved."""
        position = position if position is not None else self._position()
        state, rngs = (
            gather_state(position["state"], self.dist),
            gather_objects(position["rng"], self.dist),
        )
        failure = None
        if self.dist.is_main:
            try:
                save_checkpoint(
                    {
                        **position,
                        "rng": rngs,
                        "state": state_to_dict(state),
                        "world_size": self.dist.world_size,
                        "model_name": self.config.model,
                        "model_config": self.model_config.to_dict(),
                        "train_config": self.config.to_dict(),
                        "model": self.model.state_dict(),
                        "optimizer": self.optimizer.state_dict(),
                        "scheduler": self.scheduler.state_dict(),
                        "scaler": self.scaler.state_dict(),
                    },
                    self.run_dir / name,
                )
            except CheckpointError as err:
                failure = (
                    f"{err}. Training stopped at step {self.progress.step:,}; once the disk has "
                    "room (or the folder lets us write), continue from the last checkpoint saved "
                    f"with --resume {self.run_dir}"
                )
        # The others stop too, rather than wait for rank 0 at the next step.
        failure = from_main(failure, self.dist)
        if failure is not None:
            raise TrainingError(failure)
