"""Where a run computes: the device, its mixed precision, and the processes of a multi-GPU run.

A single process is the default. Under `torchrun --nproc_per_node N` the launcher sets RANK,
WORLD_SIZE and LOCAL_RANK; `init_distributed` sees them, joins the process group (NCCL on
GPUs, gloo on CPUs) and gives each process its own GPU.
"""

import contextlib
import os
import platform
from dataclasses import dataclass
from functools import cache

import torch
import torch.distributed as dist

DEVICES = ("auto", "cuda", "mps", "cpu")


def pick_device(name: str = "auto") -> torch.device:
    """The device for `name`: 'auto' takes CUDA, then Apple MPS, then the CPU.

    'cuda' or 'mps' on a machine without one raises ValueError (rather than silently running
    on the CPU a hundred times slower). 'cuda:1'-style names are accepted as well.
    """
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    kind = name.split(":")[0]
    if kind not in DEVICES:
        raise ValueError(
            f"unknown device {name!r}; choose one of {list(DEVICES)} (or e.g. 'cuda:1')"
        )
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            "device 'cuda' asked for, but torch sees no CUDA GPU; use --device auto or cpu"
        )
    if kind == "mps" and not torch.backends.mps.is_available():
        raise ValueError(
            "device 'mps' asked for, but torch sees no Apple GPU; use --device auto or cpu"
        )
    return torch.device(name)


# TrainConfig.amp: what a run asks for. A run records what "auto" and "on" resolved to ("bf16",
# "fp16" or "off", see `resolve_amp`), so a resumed run, an evaluation and generation compute
# in the precision the weights were trained in.
AMP_CHOICES = ("auto", "on", "off", "bf16", "fp16")


def resolve_amp(amp: str, device: torch.device) -> str:
    """The mixed precision a run on `device` uses for TrainConfig.amp: "bf16", "fp16" or "off".

    - "auto": where it is native and faster: bfloat16 on CUDA GPUs that have it (Ampere and newer:
      the range of float32, so no loss scaling), float16 with a gradient scaler on older GPUs,
      bfloat16 on CPUs with AMX or AVX512-BF16 (`cpu_has_bf16`); float32 on other CPUs (there
      bf16 is emulated, slower than float32) and on Apple GPUs.
    - "on": mixed precision wherever there is one: as "auto", but bf16 on every CPU.
    - "off": float32. "bf16" / "fp16": that dtype (fp16 on CUDA only), e.g. a recorded choice.

    Under CPU autocast the recurrent states and gate nonlinearities stay in float32 (shaq.nn.qrnn,
    shaq.nn.lstm): only the matmuls run in bf16.
    """
    if amp not in AMP_CHOICES:
        raise ValueError(f"amp must be one of {list(AMP_CHOICES)}, got {amp!r}")
    if amp in ("auto", "on"):
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        if device.type == "cpu" and (amp == "on" or cpu_has_bf16()):
            return "bf16"
        return "off"
    if amp == "fp16" and device.type != "cuda":
        raise ValueError(
            f"amp 'fp16' (float16 with a gradient scaler) needs a CUDA GPU, not {device.type}: "
            "use --amp bf16 or --amp off"
        )
    if amp == "bf16" and device.type == "mps":
        raise ValueError("amp 'bf16' is not supported on Apple GPUs (mps) here: use --amp off")
    return amp


def mixed_precision(
    device: torch.device, dtype: torch.dtype | None
) -> contextlib.AbstractContextManager:
    """Autocast to `dtype` on `device`, or nothing (float32) when `dtype` is None."""
    return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


def autocast_dtype(amp: str) -> torch.dtype | None:
    """The autocast dtype of a resolved amp ("bf16", "fp16" or "off"), None for float32."""
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}
    if amp not in dtypes:
        raise ValueError(
            f"amp must be resolved to one of {list(dtypes)} (see resolve_amp), got {amp!r}"
        )
    return dtypes[amp]


@cache
def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX), as oneDNN sees it.

    Without it oneDNN emulates bf16 matmuls slowly and has no bf16 LSTM at all.
    """
    probe = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return bool(probe is not None and torch.backends.mkldnn.is_available() and probe())


@dataclass(frozen=True)
class Distributed:
    """This process's place in a run: rank 0 of 1 when not launched by torchrun."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 alone writes files, prints and shows the progress bar."""
        return self.rank == 0


def init_distributed(device_name: str = "auto") -> tuple[Distributed, torch.device]:
    """Join the process group if torchrun started us, and pick this process's device.

    Without WORLD_SIZE > 1 in the environment this is just `pick_device(device_name)`.
    Under torchrun each process takes the GPU of its LOCAL_RANK, or the CPU with gloo.
    Calling it again in a process that already joined reuses the group.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Distributed(), pick_device(device_name)
    info = Distributed(int(os.environ["RANK"]), world_size, int(os.environ.get("LOCAL_RANK", "0")))
    device = pick_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(device)
    elif device.type == "mps":
        raise ValueError("multi-process training needs CUDA GPUs or the CPU; pass --device cpu")
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return info, device


def all_reduce_sum(tensor: torch.Tensor, info: Distributed) -> torch.Tensor:
    """Sum `tensor` over all processes, in place; a no-op in a single process."""
    if info.enabled:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def cpu_name() -> str:
    """The CPU's model name ("AMD EPYC 7B13"), for every figure that quotes a speed."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(
                line.split(":", 1)[1].strip() for line in f if line.startswith("model name")
            )
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()
