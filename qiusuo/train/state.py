"""Resumable training checkpoints inside a run directory, and the run directory itself.

    RUN/config.json                resolved config of the run (stage, every field)
    RUN/metrics.jsonl              one JSON object per step
    RUN/checkpoints/step-000200/   HF-layout model (save_model) + optimizer.safetensors
                                   + trainer_state.json (step, RNG streams, param groups);
                                   under LoRA the PEFT adapter instead of the model (the base is
                                   the parent checkpoint, frozen)
    RUN/final/                     the trained model, HF layout, with qiusuo.json metadata

No pickles: the optimizer state and torch RNG state are tensors in safetensors; the rest is JSON.
Data position needs no state: every stage derives step s's batch (and its sampling seeds) from
(seed, s) alone, so restoring the step restores the data.

Crash safety (a kill -9 or power loss at any instant leaves a usable run):
- a checkpoint is written to `.step-N.tmp-<pid>`, every file and the directory are fsync'ed, and
  only then is it renamed to `step-N` (and the parent directory fsync'ed), so a directory named
  step-N is complete on disk, not only in the page cache;
- re-saving an existing step moves the old one aside to `.step-N.old-<pid>` first and deletes it
  only after the new one is in place: there is no instant with zero copies of that step;
- `list_checkpoints` (called at start-up, resume included) first recovers what a killed save
  left: temporaries of dead processes are deleted, and a moved-aside old copy whose step-N never
  arrived is moved back.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from qiusuo.model import lora
from qiusuo.model.lora import save_adapter

OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "trainer_state.json"


def checkpoint_dir(run: Path, step: int) -> Path:
    return run / "checkpoints" / f"step-{step:06d}"


def _pid_alive(pid: int) -> bool:
    from qiusuo.registry.index import pid_alive

    if pid == os.getpid():
        return False  # our own leftovers are from a save that raised: not in progress
    return pid_alive(pid)


def recover_interrupted_saves(run: Path) -> None:
    """Delete temporaries of killed saves; restore a moved-aside step whose replacement never
    arrived. Leaves alone the temporaries of saves still running in other processes."""
    root = run / "checkpoints"
    if not root.is_dir():
        return
    for p in sorted(root.iterdir()):
        name, sep, pid = p.name.rpartition("-")
        if not (p.name.startswith(".step-") and sep and pid.isdigit()) or _pid_alive(int(pid)):
            continue
        step_name, _, kind = name[1:].rpartition(".")
        final = root / step_name
        if kind == "old" and not final.exists() and (p / STATE_FILE).is_file():
            os.replace(p, final)  # the re-save died between moving the old copy aside and renaming
            _fsync_dir(root)
        elif kind in ("old", "tmp"):
            shutil.rmtree(p, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    """fsync every file under `path`, then every directory (deepest first), so that a later
    rename publishes content that is on disk."""
    dirs = []
    for dirpath, _, filenames in os.walk(path):
        dirs.append(dirpath)
        for name in filenames:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    for d in reversed(dirs):
        _fsync_dir(Path(d))


def list_checkpoints(run: Path) -> list[Path]:
    """Complete step checkpoints of a run, oldest first (after `recover_interrupted_saves`)."""
    root = run / "checkpoints"
    if not root.is_dir():
        return []
    recover_interrupted_saves(run)
    found = [p for p in root.iterdir() if p.name.startswith("step-") and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def rng_state() -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    py = random.getstate()
    np_state = np.random.get_state()
    json_part = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], np_state[2], np_state[3], np_state[4]],
    }
    tensors = {"rng.torch": torch.get_rng_state(), "rng.numpy_keys": torch.from_numpy(np_state[1].astype(np.int64))}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    return json_part, tensors


def set_rng_state(json_part: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    v, internal, gauss = json_part["python"]
    random.setstate((v, tuple(internal), gauss))
    name, pos, has_gauss, cached = json_part["numpy"]
    np.random.set_state((name, tensors["rng.numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("rng.cuda.")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    """Flatten an optimizer's state dict into named tensors + JSON param groups."""
    sd = optimizer.state_dict()
    tensors = {}
    for idx, state in sd["state"].items():
        for key, value in state.items():
            t = value if isinstance(value, torch.Tensor) else torch.tensor(value)
            tensors[f"state.{idx}.{key}"] = t.detach().cpu().contiguous()
    return tensors, sd["param_groups"]


def load_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], groups: list[dict]) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, t in tensors.items():
        if not name.startswith("state."):
            continue
        _, idx, key = name.split(".", 2)
        state.setdefault(int(idx), {})[key] = t
    for g in groups:  # JSON turned tuples (betas) into lists
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def save_checkpoint(run: Path, step: int, model, tokenizer, optimizer, extra: dict[str, Any], keep: int,
                    metadata: dict[str, Any] | None = None) -> Path:
    """Write checkpoints/step-N atomically and keep only the newest `keep`."""
    from qiusuo.model import save_model

    final = checkpoint_dir(run, step)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    if lora.has_lora(model):  # the frozen base is the parent checkpoint: only the adapter changes
        save_adapter(model, tmp, base_model_name_or_path=(metadata or {}).get("parent"))
        (tmp / "qiusuo.json").write_text(json.dumps({**(metadata or {}), "step": step}, indent=1) + "\n")
    else:
        save_model(model, tokenizer, tmp, metadata={**(metadata or {}), "step": step})
    opt_tensors, groups = optimizer_tensors(optimizer)
    rng_json, rng_tensors = rng_state()
    save_file({**opt_tensors, **rng_tensors}, tmp / OPTIMIZER_FILE)
    state = {"step": step, "param_groups": groups, "rng": rng_json, **extra}
    (tmp / STATE_FILE).write_text(json.dumps(state, indent=1) + "\n")
    _fsync_tree(tmp)
    aside = final.with_name(f".{final.name}.old-{os.getpid()}")
    if final.exists():
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(final, aside)  # not deleted yet: until the new copy is in place, this is the step
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    shutil.rmtree(aside, ignore_errors=True)
    for old in list_checkpoints(run)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: Path, model, optimizer) -> dict[str, Any]:
    """Restore weights, optimizer and RNG streams from a step checkpoint; returns trainer_state.json."""
    from qiusuo.model.checkpoint import from_hf_state_dict, read_safetensors

    saved_lora, run_lora = (path / lora.ADAPTER_CONFIG).is_file(), lora.has_lora(model)
    if saved_lora != run_lora:
        raise ValueError(f"checkpoint {path} holds {'a LoRA adapter' if saved_lora else 'a full model'} but this "
                         f"run trains {'LoRA adapters' if run_lora else 'the full model'}; resume with the "
                         "run's own --lora-rank")
    if lora.has_lora(model):
        lora.load_adapter(model, path)
    else:
        weights = from_hf_state_dict(read_safetensors(path), model.config)
        missing, unexpected = model.load_state_dict(weights, strict=False)
        if unexpected or [k for k in missing if "inv_freq" not in k]:
            raise ValueError(f"checkpoint {path} does not match the model being trained "
                             f"(missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]})")
    state = json.loads((path / STATE_FILE).read_text())
    tensors = load_file(path / OPTIMIZER_FILE)
    load_optimizer(optimizer, tensors, state["param_groups"])
    set_rng_state(state["rng"], tensors)
    return state


def truncate_metrics(path: Path, last_step: int) -> None:
    """Drop metric lines after `last_step` (steps an interrupted run logged but did not checkpoint)."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= last_step]
    path.write_text("".join(line + "\n" for line in keep))


__all__ = ["checkpoint_dir", "list_checkpoints", "recover_interrupted_saves", "save_checkpoint", "load_checkpoint",
           "truncate_metrics"]
