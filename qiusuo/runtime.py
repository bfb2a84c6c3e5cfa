"""Process-level runtime choices every command shares: how many torch threads to use.

On a shared 2-core machine, 2 torch threads ran 1.7x faster than 1 when the machine was quiet
but 4-10x *slower* under a busy neighbour (OpenMP barrier stalls): the CPU prototype's
pretraining took 3.6 s/step instead of 0.25 s, and the training runs here 0.55 s/step with 1
thread vs 5.2 s/step with 2 at load 3.8.
"""

from __future__ import annotations

import os


def default_threads() -> int:
    """All cores on a quiet machine; on 2 cores, 1 thread once the load average says a neighbour is busy."""
    cores = os.cpu_count() or 1
    try:
        load = os.getloadavg()[0]
    except OSError:  # not available on this platform
        load = 0.0
    if cores <= 2:
        return 1 if load >= 1.5 else cores
    return max(1, cores - int(load))  # leave the cores a neighbour is using


def set_threads(threads: int | None) -> int:
    """Set torch's intra-op threads (None or 0: `default_threads()`); returns the number used."""
    import torch

    n = threads or default_threads()
    torch.set_num_threads(n)
    return n
