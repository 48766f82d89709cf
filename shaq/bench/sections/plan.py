"""The plans of a run: the shapes and repeat counts of a full run and of a --quick one."""

from dataclasses import dataclass, field, replace

from shaq.byte_lm import ModelConfig
from shaq.models import model_config
from shaq.train_config import TrainConfig


@dataclass(frozen=True)
class StepShape:
    """One training-step comparison: a model shape, batch B and segment length T.

    The shape is a preset ('paper', 'cpu' or 'smoke') and overrides of fields that every
    model's config has (d_model, memory_len, ...): each model kind gets its own config at that
    preset (`config`), so that the models of one row are of comparable size.
    """

    name: str
    preset: str
    batch: int
    seq_len: int
    warmup: int
    repeats: int
    overrides: dict = field(default_factory=dict)

    def config(self, kind: str) -> ModelConfig:
        """The config of model `kind` (one of `shaq.bench.sections.steps.STEP_MODELS`) at this
        shape. The reference-style SHA-RNN re-creates shaq's SHARNN, so it takes SHARNN's
        config."""
        name = "sharnn" if kind == "reference" else kind
        return model_config(name, self.preset, **self.overrides)


@dataclass(frozen=True)
class Plan:
    """The shapes and repeat counts of a run (full or --quick)."""

    matmul_n: int
    repeats: int
    rnn_hidden: tuple[int, ...]
    rnn_seq: tuple[int, ...]
    rnn_batch: int
    attention_d: int
    attention_seq: int
    attention_batch: int
    attention_memory: tuple[int, ...]
    attention_dropout: float
    steps: tuple[StepShape, ...]
    compile_shape: StepShape
    trainer: StepShape  # SHAQ in the Trainer against its isolated step; repeats = timed steps
    codec_positions: int  # bytes per lane that the compressor section codes
    idle_probe_s: float


def full_plan() -> Plan:
    """The full run: the `cpu` preset, a d-256 model with the paper's memory, the paper's shape."""
    # Two or more warm-up steps: the first steps of a model also fault in the pages its
    # activations need (several GB at the paper's shape); only from about the third step on
    # does the allocator reuse memory without asking the kernel for more.
    preset = TrainConfig.cpu()  # the cpu shape is the preset's batch and segment
    cpu = StepShape("cpu", "cpu", preset.batch_size, preset.seq_len, warmup=3, repeats=5)
    # The shape of the quoted 1,180 bytes/s: emsize 256, Boom 1024, 4 blocks, bptt 256,
    # the paper's memory and dropouts.
    small = StepShape("small", "paper", 16, 256, warmup=2, repeats=3, overrides={"d_model": 256})
    paper = StepShape("paper", "paper", 16, 1024, warmup=2, repeats=2)
    return Plan(
        matmul_n=4096,
        repeats=5,
        rnn_hidden=(256, 1024),
        rnn_seq=(256, 1024),
        rnn_batch=16,
        attention_d=1024,
        attention_seq=1024,
        attention_batch=16,
        attention_memory=(0, 1000, 5000),
        attention_dropout=0.1,
        steps=(cpu, small, paper),
        compile_shape=cpu,
        trainer=replace(cpu, repeats=30),
        codec_positions=256,
        idle_probe_s=2.0,
    )


def quick_plan() -> Plan:
    """--quick: tiny shapes and few repeats, to check that every section runs."""
    smoke = StepShape("smoke", "smoke", 4, 32, warmup=1, repeats=2)
    tiny = StepShape(
        "tiny-paper",
        "paper",
        4,
        64,
        warmup=1,
        repeats=2,
        overrides={"d_model": 64, "memory_len": 192},
    )
    return Plan(
        matmul_n=512,
        repeats=3,
        rnn_hidden=(64,),
        rnn_seq=(32,),
        rnn_batch=16,
        attention_d=64,
        attention_seq=32,
        attention_batch=4,
        attention_memory=(0, 64, 256),
        attention_dropout=0.1,
        steps=(smoke, tiny),
        compile_shape=smoke,
        trainer=replace(smoke, repeats=10),
        codec_positions=16,
        idle_probe_s=0.5,
    )
