"""What a training run shows a person: its header, its progress bar, and the end-of-run summary."""

from pathlib import Path

import torch
from tqdm.auto import tqdm

from shaq.train_config import TrainConfig


class ProgressBar:
    """A run's progress bar, measured in what bounds the run: its time budget when it has one
    (the bar then ends when time is up, and shows the time left), else its steps, else its
    epochs. Bytes/s, bpb and the step go in the text after the bar.

    `at` says where the run stands in each measure: {"time": seconds, "step": n, "epoch": e}.
    """

    def __init__(self, config: TrainConfig, at: dict[str, float], disable: bool):
        if config.minutes is not None:
            self.measure, total = "time", 60 * config.minutes
        elif config.steps is not None:
            self.measure, total = "step", config.steps
        else:
            self.measure, total = "epoch", config.epochs
        self.total, self.name = total, config.model
        # The text after the bar is the description: tqdm's own postfix field starts with ", ".
        self.bar = tqdm(
            total=total,
            initial=self._position(at),
            desc=config.model,
            dynamic_ncols=True,
            disable=disable,
            bar_format="{percentage:3.0f}%|{bar}| {desc}",
        )

    def _position(self, at: dict[str, float]) -> float:
        return min(at[self.measure], self.total)

    def update(self, text: str, at: dict[str, float]) -> None:
        """Show `text` (see `step_text`) and move the bar to `at`."""
        if self.measure == "time":
            left = f"{format_duration(max(self.total - at['time'], 0))} left"
        elif self.measure == "step":
            left = f"step {at['step']:,}/{self.total:,}"
        else:
            left = f"epoch {at['epoch']:.3f}/{self.total:g}"
        self.bar.set_description_str(f"{self.name} | {text} | {left}", refresh=False)
        self.bar.update(self._position(at) - self.bar.n)

    def close(self) -> None:
        self.bar.close()


def format_header(
    config: TrainConfig,
    n_params: int,
    data: str,
    train_bytes: int,
    device: str,
    amp_dtype: torch.dtype | None,
    run_dir: Path,
) -> str:
    """The line a run starts with: its model and data, where and how it computes, until when."""
    precision = {
        None: "float32",
        torch.bfloat16: "bf16 autocast",
        torch.float16: "fp16 autocast + scaler",
    }
    until = " or ".join(
        part
        for part in (
            f"{config.epochs:g} epochs" if config.epochs else "",
            f"{config.steps:,} steps" if config.steps else "",
            f"{config.minutes:g} min" if config.minutes else "",
        )
        if part
    )
    return (
        f"{config.model}: {n_params:,} parameters | {data}: {train_bytes:,} training bytes | "
        f"{device}, {precision[amp_dtype]} | batch {config.batch_size} x {config.seq_len} | "
        f"{rate_text(config)} | until {until} | run dir {run_dir}"
    )


def rate_text(config) -> str:
    """How a TrainConfig sets the learning rate, e.g. 'lamb lr 0.004, warmup 100, linear decay to
    0'."""
    decay = ", linear decay to 0" if config.decay == "linear" else ""
    return f"{config.optimizer} lr {config.lr:g}, warmup {config.warmup}{decay}"


def step_text(metrics: dict, valid_bpb: float | None, rate: float) -> str:
    """A step's numbers for the progress bar: its loss, the last validation, training bytes/s."""
    parts = [
        "skipped (non-finite)"
        if metrics.get("skipped")
        else f"loss {metrics['loss']:.3f} bpb {metrics['bpb']:.3f}"
    ]
    if valid_bpb is not None:
        parts.append(f"valid {valid_bpb:.3f}")
    parts.append(f"{rate:,.0f} B/s")
    return " | ".join(parts)


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


def format_summary(summary: dict) -> str:
    """The end-of-run report (the summary `Trainer.fit` returns), a few human-readable lines."""
    minutes, seconds = divmod(summary["seconds"], 60)
    lines = [
        f"done: {summary['steps']:,} steps, {summary['bytes']:,} bytes in "
        f"{int(minutes)}m{seconds:04.1f}s ({summary['bytes_per_second']:,.0f} training bytes/s)",
        f"valid bpb {summary['valid_bpb']:.4f} on {summary['valid_bytes']:,} bytes | test bpb "
        f"{summary['test_bpb']:.4f} on {summary['test_bytes']:,} bytes ({summary['data']}, weights "
        f"of step {summary['tested_step']:,})",
        f"run dir: {summary['run_dir']}",
    ]
    if summary["nonfinite_steps"]:
        lines.insert(1, f"skipped {summary['nonfinite_steps']} non-finite steps")
    return "\n".join(lines)
