"""Where a run computes: the device, its mixed precision, and the processes of a multi-GPU run.

A single process is the default. Under `torchrun --nproc_per_node N` the launcher sets RANK,
WORLD_SIZE and LOCAL_RANK; `init_distributed` sees them, joins the process group (NCCL on
GPUs, gloo on CPUs) and gives each process its own GPU.
"""

import os
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
        raise ValueError(f"unknown device {name!r}; choose one of {list(DEVICES)} (or e.g. 'cuda:1')")
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' asked for, but torch sees no CUDA GPU; use --device auto or cpu")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise ValueError("device 'mps' asked for, but torch sees no Apple GPU; use --device auto or cpu")
    return torch.device(name)


def autocast_dtype(device: torch.device, amp: bool) -> torch.dtype | None:
    """The dtype of mixed precision on `device`, or None for plain float32.

    CUDA only: bfloat16 where the GPU has it (Ampere and newer: same range as float32, so no
    loss scaling and no scale collapse like the reference's apex runs), else float16, which
    needs a gradient scaler. The CPU and MPS run in float32: autocast there is slower or
    less tested than it is worth for models of this size.
    """
    if not amp or device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


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
