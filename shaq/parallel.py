"""Data-parallel training under torchrun: what each process reads and carries, and what the
processes tell each other.

Every process holds its own block of the rows of the global batch (rank 0 the first, and so on)
and carries the recurrent state of those rows only (`share`). A checkpoint holds the state of
the whole batch (`gather_state`), so that a run may be resumed on another number of processes.
Rank 0 alone downloads the corpus and writes the run folder; what it finds out, the others
learn from it (`from_main`). Without torchrun every function here is the single-process case:
the share is everything, and nothing is exchanged.
"""

import torch
import torch.distributed as dist

import shaq.data
from shaq.byte_lm import State
from shaq.data import Corpus, DataError, load_enwik8, load_standin
from shaq.device import Distributed

# A run not launched by torchrun. Distributed is frozen, so one shared default is safe.
_SINGLE_PROCESS = Distributed()


def load_corpus(
    data: str, root: str = "data", info: Distributed = _SINGLE_PROCESS, verbose: bool = True
) -> Corpus:
    """The corpus for TrainConfig.data (see `shaq.data.load_corpus`), downloaded once.

    In a multi-process run rank 0 alone may download enwik8 and print the 'auto' notice; the
    others wait for it and then read what it chose from its files, or raise its DataError.
    """
    corpus, chosen = None, None
    if info.is_main:
        try:
            corpus = shaq.data.load_corpus(data, root, verbose=verbose)
            chosen = "enwik8" if corpus.name == "enwik8" else "standin"
        except DataError as err:
            chosen = err
    chosen = from_main(chosen, info)  # the others wait here for rank 0's download
    if isinstance(chosen, DataError):
        raise chosen
    if corpus is not None:
        return corpus
    return load_enwik8(root, download=False) if chosen == "enwik8" else load_standin()


def share(rows: torch.Tensor, info: Distributed) -> torch.Tensor:
    """This process's block of rows [B, ...] -> [B / world, ...]; with fewer rows than processes
    (a small evaluation batch) the last processes get none."""
    return rows.tensor_split(info.world_size)[info.rank]


def gather_state(state: State | None, info: Distributed) -> State | None:
    """The carried states of all processes, concatenated along the batch: the global batch's
    state."""
    if state is None or not info.enabled:
        return state

    def gather(t: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(t) for _ in range(info.world_size)]
        dist.all_gather(parts, t.contiguous())
        return torch.cat(parts)

    return state.map(gather)


def gather_objects(value: object, info: Distributed) -> list:
    """Every process's `value` (any picklable object), in rank order."""
    if not info.enabled:
        return [value]
    values = [None] * info.world_size
    dist.all_gather_object(values, value)
    return values


def from_main(value: object, info: Distributed) -> object:
    """Rank 0's `value` (any picklable object) in every process; the others pass a placeholder."""
    if not info.enabled:
        return value
    shared = [value]
    dist.broadcast_object_list(shared, src=0)
    return shared[0]
