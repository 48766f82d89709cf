"""The command line: `python -m shaq train | eval | generate | compress | decompress`.

    python -m shaq train --model shaq --preset cpu              # ten minutes on a CPU
    python -m shaq train --preset smoke --data standin --steps 50 --out runs/try
    python -m shaq train --resume runs/try --steps 100          # continue a run exactly
    python -m shaq train --init-from runs/try/best.pt --lr 1e-3 --epochs 5 --seed 125  # second pass
    python -m shaq eval runs/try --split test                   # --dynamic: dynamic evaluation
    python -m shaq generate runs/try --prompt "The " -n 200
    python -m shaq compress runs/try notes.txt notes.shaqz      # an arithmetic coder driven by
                                                                # the model
    python -m shaq decompress runs/try notes.shaqz notes.txt

`train` takes every field of the model configs (SHARNNConfig, LSTMConfig, ShatterConfig: the model's
shape) and of TrainConfig (training) as an option, e.g. `--d-model 512 --attention-layers 0,2
--lr 1e-3 --no-variable-seq-len`; a field left out keeps the preset's value. Mistakes (an unknown
option, an option of another model than --model's, an impossible value, data that cannot be had, a
run folder that another process is writing, a damaged checkpoint) stop before any work with a
one-line message and exit status 2. A run that fails (a non-finite loss, a checkpoint that cannot be
written) exits with 1; Ctrl-C or SIGTERM stops it after the step in progress with last.pt saved and
exits with 130 or 143 (128 + the signal).
"""

import sys

import torch.distributed as dist

from shaq.cli_commands import COMMANDS
from shaq.cli_parser import parse_args


def main(argv: list[str] | None = None) -> int:
    """Run the command line `argv` (default sys.argv[1:]); returns the exit status."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        return COMMANDS[args.command](args)
    finally:
        if dist.is_initialized():  # joined by the Trainer under torchrun
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
