"""pytest settings for the library's tests.

The tests run many small tensor operations, where a second OpenMP thread costs more in
synchronisation than it gains (on the 2-core CI machine, 2 threads made the suite about 5x
slower). Subprocesses the tests start (the CLI, torchrun) inherit the same settings.
Set ``OMP_NUM_THREADS`` yourself to override.
"""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402  (after the environment is set, so OpenMP reads it)

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
