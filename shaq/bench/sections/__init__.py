"""What the benchmark measures: the run plans and one function per measured section.

Each section function takes a `Context` (device, bf16, repeats) and a `Plan` (the shapes of a
full or --quick run) and returns plain data (dicts and lists of numbers) that
`shaq.bench.report` turns into a table and `--json` writes out as it is. One file per family:
`plan` (the shapes of a run), `layers` (the matmul peak and single layers: QRNN against LSTM,
the forget-mult, attention) and `steps` (whole training steps: the step table, the Trainer
against its isolated step, the profile, torch.compile). The compressor's section is
`shaq.bench.codec`.
"""

from shaq.bench.sections.layers import bench_attention, bench_forget_mult, bench_rnn, matmul_peak
from shaq.bench.sections.plan import Plan, StepShape, full_plan, quick_plan
from shaq.bench.sections.steps import (
    bench_compile,
    bench_steps,
    bench_trainer,
    make_step,
    profile_steps,
)

__all__ = [
    "Plan",
    "StepShape",
    "bench_attention",
    "bench_compile",
    "bench_forget_mult",
    "bench_rnn",
    "bench_steps",
    "bench_trainer",
    "full_plan",
    "make_step",
    "matmul_peak",
    "profile_steps",
    "quick_plan",
]
