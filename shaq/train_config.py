"""What a training run is asked to do: `TrainConfig`, and the configs a run continues with.

A run is defined by two configs: its model's (`shaq.models`: SHARNNConfig, LSTMConfig, ...) and a
TrainConfig, both saved in every checkpoint. A resumed run keeps both, except the settings of
how long it runs and how it reports (RESUMABLE); a new run from another's weights (the
reference's second pass) keeps its model and starts from its TrainConfig.
"""

from dataclasses import asdict, dataclass, replace
from pathlib import Path

from shaq.byte_lm import ModelConfig
from shaq.checkpoint import CheckpointError, saved_model_config
from shaq.data import CORPORA
from shaq.device import AMP_CHOICES, DEVICES
from shaq.models import MODELS

# How the learning rate falls after the warmup. 'linear' multiplies it by 1 - p, where p is the
# fraction of the run's budget used so far: the largest of steps / `steps`, epochs / `epochs` and
# elapsed / `minutes` for those that are set, so a run that stops on time ends at a rate near 0.
DECAYS = ("none", "linear")


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

    model: str = "shaq"  # a name in shaq.models.MODELS: 'shaq', 'sharnn', 'lstm' or 'shatter'
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
    warmup: int = 800  # steps of linear warmup, then a constant rate (or the decay below)
    decay: str = "none"  # 'none', or 'linear': down to 0 as the run's budget runs out (below)
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
    amp: str = (
        "auto"  # mixed precision: 'auto', 'on', 'off', 'bf16' or 'fp16' (shaq.device.resolve_amp)
    )
    compile: bool = (
        False  # torch.compile the model (0.58x eager for SHAQ on a 2-core CPU: see README)
    )
    on_nonfinite: str = "stop"  # a NaN/inf loss: 'stop' (raise TrainingError) or 'skip' the step
    out_dir: str | None = None  # the run folder; None = runs/<model>-<date>-<time>
    init_from: str | None = (
        None  # a checkpoint whose weights start a new run (fresh optimizer and schedule)
    )

    def __post_init__(self):
        problems = []

        def need(ok: bool, message: str) -> None:
            if not ok:
                problems.append(message)

        need(self.model in MODELS, f"model must be one of {sorted(MODELS)}, got {self.model!r}")
        need(self.data in CORPORA, f"data must be one of {list(CORPORA)}, got {self.data!r}")
        for name in ("batch_size", "seq_len", "eval_batch_size", "test_batch_size"):
            need(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_bytes", "eval_bytes", "final_bytes"):
            value = getattr(self, name)
            need(
                value is None or value >= 2,
                f"{name} must be >= 2 bytes or None (= the whole split), got {value}",
            )
        need(
            not self.variable_seq_len or self.seq_len >= 5,
            "variable_seq_len needs seq_len >= 5 (lengths are clamped to [5, seq_len]), got "
            f"{self.seq_len}",
        )
        need(
            self.epochs is not None or self.steps is not None or self.minutes is not None,
            "set epochs, steps or minutes (any of them) to say when to stop",
        )
        need(
            self.epochs is None or self.epochs > 0, f"epochs must be > 0 or None, got {self.epochs}"
        )
        need(self.steps is None or self.steps >= 1, f"steps must be >= 1 or None, got {self.steps}")
        need(
            self.minutes is None or self.minutes > 0,
            f"minutes must be > 0 or None, got {self.minutes}",
        )
        need(
            self.optimizer in ("lamb", "adam"),
            f"optimizer must be 'lamb' or 'adam', got {self.optimizer!r}",
        )
        need(self.lr > 0, f"lr must be > 0, got {self.lr}")
        need(self.warmup >= 0, f"warmup must be >= 0 steps, got {self.warmup}")
        need(self.decay in DECAYS, f"decay must be one of {list(DECAYS)}, got {self.decay!r}")
        need(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        need(0 <= self.min_trust < 1, f"min_trust must be in [0, 1), got {self.min_trust}")
        need(self.clip >= 0, f"clip must be >= 0 (0 = no clipping), got {self.clip}")
        need(
            self.eval_interval >= 0,
            f"eval_interval must be >= 0 (0 = only at the end), got {self.eval_interval}",
        )
        need(
            self.save_interval >= 0,
            f"save_interval must be >= 0 (0 = only at the end), got {self.save_interval}",
        )
        need(
            self.device.split(":")[0] in DEVICES,
            f"device must be one of {list(DEVICES)} (or e.g. 'cuda:1'), got {self.device!r}",
        )
        need(self.amp in AMP_CHOICES, f"amp must be one of {list(AMP_CHOICES)}, got {self.amp!r}")
        need(
            self.on_nonfinite in ("stop", "skip"),
            f"on_nonfinite must be 'stop' or 'skip', got {self.on_nonfinite!r}",
        )
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
        """Ten minutes on 2 CPU cores with the model's cpu() preset: batch 16 x 128, a short
        warmup, a linear decay to 0 at the end of the time, and a final evaluation on at most
        1 MB of valid and test (all of the stand-in's).

        One setting for every model, chosen for SHAQ by training runs of equal wall-clock
        (tools/cpu_sweep.py; the sweep's tables are in the README and chapter 11): of learning
        rates 2e-3, 4e-3 and 1e-2, batch 8 or 16, segments of 128, 256 or 512 bytes, a constant
        rate or a linear decay, and the reference's initialisation of the QRNN gates, the values
        here reached the lowest validation bpb.
        """
        return replace(
            cls(
                data="auto",
                seq_len=128,
                epochs=None,
                minutes=10,
                lr=4e-3,
                warmup=100,
                decay="linear",
                eval_interval=400,
                eval_each_epoch=False,
                eval_bytes=131_072,
                final_bytes=1_000_000,
                save_interval=400,
            ),
            **overrides,
        )

    @classmethod
    def smoke(cls, **overrides) -> "TrainConfig":
        """Seconds, for tests and CI: 20 steps of 4 x 32 on a 100 kB prefix of the stand-in."""
        return replace(
            cls(
                data="standin",
                max_bytes=100_000,
                batch_size=4,
                seq_len=32,
                variable_seq_len=False,
                epochs=None,
                steps=20,
                warmup=5,
                eval_interval=10,
                eval_each_epoch=False,
                eval_bytes=4096,
                eval_batch_size=4,
                test_batch_size=4,
                final_bytes=8192,
                save_interval=10,
            ),
            **overrides,
        )

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
RESUMABLE = frozenset(
    {
        "epochs",
        "steps",
        "minutes",
        "eval_interval",
        "save_interval",
        "final_bytes",
        "device",
        "amp",
        "compile",
        "on_nonfinite",
        "data_root",
    }
)


def saved_train_config(file: str | Path, checkpoint: dict) -> TrainConfig:
    """The TrainConfig a checkpoint (read from `file`) was trained with, e.g. for its evaluation:
    its recorded amp and seq_len."""
    return _saved_configs(
        Path(file), checkpoint, {**LEGACY_TRAIN_FIELDS, **checkpoint["train_config"]}
    )[0]


def _legacy_amp(train: dict, checkpoint: dict) -> dict:
    """`train` with shaq 0.1's amp (a bool: True meant mixed precision on CUDA only) as a choice."""
    if not isinstance(train.get("amp"), bool):
        return train
    on_cuda = checkpoint["rng"][0]["device_type"] == "cuda"
    return {**train, "amp": "auto" if train["amp"] and on_cuda else "off"}


def resume_configs(
    file: Path, checkpoint: dict, overrides: dict, model_overrides: dict
) -> tuple[TrainConfig, ModelConfig]:
    """The configs of the run that `checkpoint` (read from `file`) continues: its own, with
    `overrides` of RESUMABLE fields. Any other TrainConfig field, or any entry of
    `model_overrides`, that differs from the checkpoint is a CheckpointError."""
    saved = {**LEGACY_TRAIN_FIELDS, **checkpoint["train_config"]}
    model = saved_model_config(checkpoint).to_dict()
    problems = [
        f"{key} {saved.get(key)!r} (checkpoint) vs {value!r}"
        for key, value in overrides.items()
        if key not in RESUMABLE and saved.get(key) != value
    ]
    problems += [
        f"{key} {model.get(key, '<absent>')!r} (checkpoint) vs {value!r}"
        for key, value in model_overrides.items()
        if model.get(key, "<absent>") != value
    ]
    if problems:
        raise CheckpointError(
            "a resumed run keeps its model and training settings (only "
            f"{', '.join(sorted(RESUMABLE))} may change); differs: " + "; ".join(problems)
        )
    return _saved_configs(file, checkpoint, {**saved, **overrides, "out_dir": str(file.parent)})


def start_from_configs(
    file: Path, source: dict, overrides: dict
) -> tuple[TrainConfig, ModelConfig]:
    """The configs of a new run from the weights of `source` (read from `file`): its model's, and
    its TrainConfig with `overrides` (any field), `init_from` the file and a new run folder."""
    saved = {**LEGACY_TRAIN_FIELDS, **source["train_config"], "out_dir": None}
    return _saved_configs(file, source, {**saved, **overrides, "init_from": str(file)})


def _saved_configs(file: Path, checkpoint: dict, train: dict) -> tuple[TrainConfig, ModelConfig]:
    """The TrainConfig of the settings `train` and the checkpoint's model config; a field this
    shaq does not know (a checkpoint from another version) is a CheckpointError naming `file`."""
    try:
        return TrainConfig(**_legacy_amp(train, checkpoint)), saved_model_config(checkpoint)
    except TypeError as err:
        raise CheckpointError(f"{file} holds settings this shaq does not know: {err}") from err
