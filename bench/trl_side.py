"""What the GRPO benches share to run TRL's GRPOTrainer beside qiusuo (bench/grpo.py, bench/grpo_real.py).

- `check_versions`: the TRL and transformers versions the figures were measured with (a warning otherwise);
- `prompt_dataset`: a `datasets.Dataset` of prompts in a fixed order (read with `shuffle_dataset=False`);
- `StepTimer`: a callback timing each optimizer step (wall and CPU seconds);
- `spy`: wrap one of the trainer's methods to time its calls (the generation inside a step).

Imports of datasets/transformers happen inside the functions: importing this module costs nothing.
"""

from __future__ import annotations

import importlib.metadata
import time
from typing import Any, Callable

# The versions the GRPO bench figures were measured with; another version runs, with a warning in the output.
PINNED = {"trl": "1.16.0", "transformers": "5.24.0"}


def check_versions() -> dict[str, str | None]:
    found = {}
    for name, want in PINNED.items():
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            raise SystemExit(f"{name} is not installed; install the dev extra: pip install -e '.[dev]'") from None
        if found[name] != want:
            print(f"WARNING: {name} {found[name]} installed; these figures were pinned at {want}")
    return found


def prompt_dataset(prompts: list[str], fingerprint: str):
    """The prompts as a Dataset, row order kept. An explicit fingerprint: Dataset.from_list's own hashing of
    the Arrow table fails with datasets 5.2 and pyarrow 26 ("Can't pickle <class 'MonthDayNano'>")."""
    from datasets import Dataset
    from datasets.table import InMemoryTable

    return Dataset(InMemoryTable.from_pylist([{"prompt": p} for p in prompts]), fingerprint=fingerprint)


def step_timer(on_step_end: Callable[[], None] | None = None):
    """A TrainerCallback whose `wall` and `cpu` lists get each optimizer step's seconds (and `threads` the
    torch threads seen at each step's end). on_step_begin ..
    on_step_end spans generation, scoring, loss, backward and the optimizer step; the trainer's logging
    runs after on_step_end, as qiusuo's metrics line is written after its step. `on_step_end`, if given, is
    called at each step's end, after the timing (to note the memory there, say)."""
    import torch
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.wall: list[float] = []
            self.cpu: list[float] = []
            self.threads: set[int] = set()
            self.t0 = self.c0 = 0.0

        def on_step_begin(self, args, state, control, **kw):
            self.t0, self.c0 = time.perf_counter(), time.process_time()

        def on_step_end(self, args, state, control, **kw):
            self.wall.append(time.perf_counter() - self.t0)
            self.cpu.append(time.process_time() - self.c0)
            self.threads.add(torch.get_num_threads())
            if on_step_end is not None:
                on_step_end()

    return StepTimer()


def spy(obj: Any, method: str, after: Callable[[float, Any], None]) -> None:
    """Replace obj.method by a wrapper that calls `after(seconds, result)` once the original returns."""
    original = getattr(obj, method)

    def timed(*args, **kwargs):
        t0 = time.perf_counter()
        out = original(*args, **kwargs)
        after(time.perf_counter() - t0, out)
        return out

    setattr(obj, method, timed)
