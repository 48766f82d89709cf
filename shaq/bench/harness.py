"""How the benchmark measures: timing, others' CPU use, peak memory, the CPU allocator.

Nothing here knows about models; `shaq.bench.sections` builds the things it times.
"""

import ctypes
import gc
import os
import statistics
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch

# A run counts as quiet when other processes used less than this many cores on average
# in every section, and the matmul peak at the end is within PEAK_DRIFT of the start's.
QUIET_OTHERS_CORES = 0.1
PEAK_DRIFT = 0.1


# ----------------------------------------------------------------------------- timing


@dataclass
class Context:
    """What every section needs: where to run, how, and how many times."""

    device: torch.device
    bf16: bool
    repeats: int

    def autocast(self) -> AbstractContextManager:
        """bfloat16 autocast on the context's device with --bf16, else a context doing nothing."""
        if not self.bf16:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)


def synchronize(device: torch.device) -> None:
    """Wait for queued CUDA work, so that wall time covers it; nothing to wait for elsewhere."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(
    fn: Callable[[], object], device: torch.device, warmup: int, repeats: int
) -> list[float]:
    """Seconds of each of `repeats` calls of fn, after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return times


def median_time(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> float:
    """The median of `time_calls`: robust to the odd call that another process slowed down."""
    return statistics.median(time_calls(fn, device, warmup, repeats))


# ----------------------------------------------------------------------------- contention


def _proc_stat() -> tuple[int, int] | None:
    """(busy ticks of the whole machine, ticks used by this process), or None off Linux.

    Busy includes steal: time the hypervisor gave this VM's cores to someone else.
    """
    try:
        with open("/proc/stat") as f:
            user, nice, system, _idle, _iowait, irq, softirq, steal = map(
                int, f.readline().split()[1:9]
            )
        with open("/proc/self/stat") as f:
            # Field 2 (the command) may hold spaces; utime and stime are fields 14 and 15.
            after_command = f.read().rsplit(")", 1)[1].split()
        own = int(after_command[11]) + int(after_command[12])
    except (OSError, ValueError, IndexError):
        return None
    return user + nice + system + irq + softirq + steal, own


class CpuMonitor:
    """Measures the CPU that *other* processes use, in cores, between start() and stop().

    The machine's busy time minus this process's own CPU time, per second of wall time.
    While we compute on every core, others can only run by taking cores from us, so this
    is also roughly the fraction of our compute we lost to them.
    """

    def __init__(self) -> None:
        self.hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self._start: tuple[float, tuple[int, int] | None] | None = None

    def start(self) -> None:
        """Begin a measurement."""
        self._start = (time.monotonic(), _proc_stat())

    def stop(self) -> float | None:
        """Cores that other processes used on average since start(), or None off Linux."""
        t0, s0 = self._start
        t1, s1 = time.monotonic(), _proc_stat()
        if s0 is None or s1 is None or t1 <= t0:
            return None
        others = (s1[0] - s0[0]) - (s1[1] - s0[1])
        return max(others, 0) / self.hz / (t1 - t0)

    def idle_probe(self, seconds: float) -> float | None:
        """Others' CPU use while this process sleeps: how busy the machine is without us."""
        self.start()
        time.sleep(seconds)
        return self.stop()


def assess_contention(contention: dict) -> dict:
    """quiet (bool), summary and warning from what CpuMonitor and the two peaks measured."""
    idle = contention["others_cores_idle"]
    measured = [v for v in [idle, *contention["others_cores"].values()] if v is not None]
    start, end = contention["peak_gflops_start_end"]
    drift = abs(end - start) / start
    problems = []
    if measured and max(measured) >= QUIET_OTHERS_CORES:
        problems.append(f"other processes used up to {max(measured):.2f} cores while this ran")
    if drift >= PEAK_DRIFT:
        problems.append(f"the matmul peak moved by {100 * drift:.0f}% during the run")
    others = f"{max(measured):.2f} cores at most" if measured else "unknown (no /proc/stat)"
    summary = (
        f"other processes used {others}; matmul peak {start:.0f} GFLOP/s at the start, "
        f"{end:.0f} at the end"
    )
    warning = None
    if problems:
        warning = "; ".join(problems) + ": timings are unreliable, re-run on a quiet machine"
    return {"quiet": not problems, "summary": summary, "warning": warning}


# ----------------------------------------------------------------------------- memory


def tune_cpu_allocator() -> bool:
    """Make glibc keep freed memory for reuse instead of handing it back to the system.

    PyTorch's CPU tensors come from malloc. glibc serves large blocks (above a threshold
    that adapts up to 32 MiB) with fresh mmap()s and unmaps them when freed, so every
    step's big activations (hundreds of MB at the paper's shape) are page-faulted and
    zeroed by the kernel again, which shows up as kernel time in every step. With mmap off
    (M_MMAP_MAX = 0) and trimming off (M_TRIM_THRESHOLD = -1) freed memory stays in the
    heap and the next step reuses it; the cost is that the process keeps its high-water
    mark. The same as starting Python with MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=-1.
    Returns whether it applied (glibc only).
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # from glibc's malloc.h
    return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, -1))


class PeakMemory:
    """Peak memory of what runs between reset() and peak(), above what was there before.

    CUDA: torch.cuda.max_memory_allocated, i.e. tensors only. CPU: the process's resident
    set high-water mark (VmHWM in /proc/self/status), which the kernel lets us reset by
    writing 5 to /proc/self/clear_refs. tracemalloc and resource.getrusage do not work
    here: tracemalloc does not see torch's allocator, and ru_maxrss cannot be reset, so
    every model after the biggest one would read the same. Before each reset we return
    freed heap memory to the system (malloc_trim) so the baseline is what is really held;
    the peak then covers parameters, gradients, optimizer state and activations.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.base = 0
        self.ok = True

    @staticmethod
    def _status_kib(field: str) -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
        raise OSError(f"{field} not in /proc/self/status")

    def reset(self) -> None:
        """Start a new measurement from what the process holds now."""
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            return
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
            self.base = self._status_kib("VmRSS") * 1024
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:  # not Linux/glibc, or clear_refs not writable: no CPU peak
            self.ok = False

    def peak(self) -> int | None:
        """Bytes above the baseline at the high-water mark since reset(), or None."""
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) - self.base
        if not self.ok:
            return None
        return self._status_kib("VmHWM") * 1024 - self.base
