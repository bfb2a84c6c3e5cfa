"""The one training loop every stage runs on.

A stage hands `Trainer.fit` a `step_fn(step) -> metrics`; inside it the stage computes its losses
and calls `trainer.backward(loss)` and `trainer.optimizer_step()` (once per step for pretraining
and SFT, once per minibatch and pass for GRPO). The trainer owns everything else:

- LoRA (`--lora-rank`, qiusuo/model/lora.py): adapters on the frozen base, only they in AdamW;
  `--gradient-checkpointing` recomputes each decoder layer in the backward pass;
- AdamW (decay on matrices only), linear warmup + cosine (or constant), computed from the step
  number so that resuming needs no scheduler object; grad clipping; MoE router-bias balancing
  after every optimizer step; bf16 autocast where the device supports it;
- the run directory: config.json, metrics.jsonl, step checkpoints every `save_every` steps, and
  `--resume` from the newest one (see state.py for why this is exact);
- Ctrl-C: the first one finishes the current step, saves a checkpoint and returns; a second one
  aborts at once. A NaN/inf loss or gradient norm stops the run naming the step; the last good
  checkpoint stays untouched;
- a rich progress bar with step, ETA, loss or reward, and tokens/s.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from qiusuo.model import lora
from qiusuo.runtime import ThreadTuner, fresh_measurement, pin_mmap_threshold

from .config import TrainConfig
from .data import pad_rows
from .state import list_checkpoints, load_checkpoint, save_checkpoint, truncate_metrics

# Fields that may change between a run and its --resume without changing the result.
# Settings a --resume may change: they alter speed or bookkeeping, not the trajectory. Ray's
# placement too: a restarted cluster has a new address, and the rollout worker count does not
# change results (per-prompt seeds); the learner count changes only float summation order.
RESUMABLE_CHANGES = {"steps", "resume", "progress", "threads", "device", "save_every", "keep_checkpoints",
                     "eval_every", "eval_problems", "register", "ray", "address", "rollout_workers",
                     "learner_workers", "gradient_checkpointing"}


class NonFiniteLossError(ValueError):
    """The loss or gradient norm became NaN/inf; the run stops and keeps its last good checkpoint."""


@dataclass
class FitResult:
    status: str  # "completed" | "interrupted"
    step: int  # optimizer steps completed
    checkpoint: Path | None
    seconds: float


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Learning rate of (0-based) step `step`: linear warmup to cfg.lr, then cosine to lr * min_lr_ratio."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    span = max(1, cfg.steps - cfg.warmup_steps - 1)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def setup_torch(cfg: TrainConfig) -> None:
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    pin_mmap_threshold()  # large transients are mmapped and returned: no heap fragmentation (peak RSS)


def thread_tuner(cfg: TrainConfig) -> ThreadTuner | None:
    """A ThreadTuner when the run's thread count is measured (--threads 0, the default) on a CPU device."""
    if not getattr(cfg, "auto_threads", False) or torch.device(cfg.device).type != "cpu":
        return None
    if getattr(cfg, "ray", False):  # the work runs in Ray actors with their own --threads, not in this loop
        return None
    measured = fresh_measurement()  # e.g. the demo's pretraining, just before its GRPO
    return ThreadTuner(start=measured or cfg.threads, measure_first=measured is None)


def autocast_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    """None means full fp32. 'auto' uses bf16 only on CUDA devices that support it: on CPU the
    tiny models here are bound by Python and memory, not matmul throughput (not measured faster)."""
    if cfg.dtype == "float32":
        return None
    if cfg.dtype == "bfloat16":
        return torch.bfloat16
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


class Trainer:
    def __init__(self, cfg: TrainConfig, model, tokenizer, stage: str, metadata: dict[str, Any] | None = None):
        self.cfg = cfg
        self.model = model
        self.tokenizer = tokenizer
        self.stage = stage
        self.metadata = metadata or {}
        self.run = Path(cfg.out)
        self.device = torch.device(cfg.device)
        self.amp_dtype = autocast_dtype(cfg, self.device)
        if cfg.lora_rank and not lora.has_lora(model):
            # Freezes the base; only the adapters have requires_grad, so only they reach AdamW.
            lora.apply_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets)
        self.lora = lora.has_lora(model)
        model.gradient_checkpointing = cfg.gradient_checkpointing
        params = [p for p in model.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
        ]
        self.optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=1e-8)
        self.step = 0  # optimizer steps completed (the next step to run has this 0-based index)
        self.optimizer_updates = 0
        self.thread_tuner = thread_tuner(cfg)  # None: the count the config names, kept
        self._stop_requested = False
        self._current_step = 0

    # ---------------------------------------------------------------- used by stages
    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def backward(self, loss: torch.Tensor) -> None:
        if not torch.isfinite(loss):
            raise NonFiniteLossError(self._nonfinite_message("loss", float(loss.detach())))
        loss.backward()

    def completion_step(self, rows: Sequence[tuple[Sequence[int], Sequence[int]]], pad: int) -> dict[str, Any]:
        """One optimizer step of next-token loss on (ids, target mask) rows, the loss the token-weighted
        mean over every target token of the step (pretraining and SFT). A mask holds each token's loss
        weight: 0 or 1, or an importance weight (pretraining's --blurt-rows).

        The rows run as length groups (`length_micro_batches`), not as one batch padded to the longest
        row: the demo's corpus mixes 18-token blurts with 42-token scratchpads, so one padded batch is
        ~43% padding and forward+backward cost is linear in padded tokens (matmuls are ~70% of it)."""
        total = sum(sum(m) for _, m in rows)  # target tokens of the whole step
        loss_sum, lm_sum, padded = 0.0, 0.0, 0
        for idx in length_micro_batches([len(r) for r, _ in rows], self.cfg.grad_accum):
            ids, mask = pad_rows([rows[i][0] for i in idx], [rows[i][1] for i in idx], pad, self.device,
                                 weighted=True)
            padded += ids.numel()
            with self.autocast():
                out = self.model.compute_loss(ids, mask)
            weight = out.num_tokens / max(total, 1)  # token-weighted mean over micro-batches
            self.backward(out.loss * weight)
            loss_sum += float(out.loss.detach()) * weight
            lm_sum += float(out.lm_loss.detach()) * weight
        metrics = {"loss": loss_sum, "lm_loss": lm_sum, "tokens": sum(len(r) for r, _ in rows),
                   "target_tokens": total, "padded_tokens": padded}
        metrics.update(self.optimizer_step())
        return metrics

    def optimizer_step(self) -> dict[str, float]:
        """Clip, step, zero the gradients, rebalance the MoE routers."""
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        max_norm = self.cfg.grad_clip if self.cfg.grad_clip > 0 else float("inf")
        norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
        if not math.isfinite(norm):
            self.optimizer.zero_grad(set_to_none=True)
            raise NonFiniteLossError(self._nonfinite_message("gradient norm", norm))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.optimizer_updates += 1
        out = {"grad_norm": norm}
        # Under LoRA the base, router biases included, stays frozen (the adapter alone must reproduce
        # the trained model on its base): gamma 0 reports the loads and clears them, moving nothing.
        out.update(self.model.update_router_bias(gamma=0.0) if self.lora else self.model.update_router_bias())
        return out

    def _nonfinite_message(self, what: str, value: float) -> str:
        last = list_checkpoints(self.run)
        keep = f"the last good checkpoint is {last[-1]}" if last else "no checkpoint was written yet"
        return (f"{what} is {value} at step {self._current_step + 1}; the run stopped and {keep}. "
                "Lower --lr, keep --grad-clip on, or use --dtype float32")

    # ---------------------------------------------------------------- the loop
    def resume_if_asked(self) -> None:
        """Before fit: load the newest checkpoint when cfg.resume, else refuse to clobber a run."""
        found = list_checkpoints(self.run)
        if not self.cfg.resume:
            if found:
                raise ValueError(f"{self.run} already holds checkpoints of an earlier run; pass --resume to "
                                 "continue it, or choose another --out")
            return
        if not found:
            raise ValueError(f"--resume: no checkpoint in {self.run}/checkpoints; drop --resume to start a new run")
        saved = self.run / "config.json"
        if saved.exists():
            before = json.loads(saved.read_text())["config"]
            now = self.cfg.to_dict()
            changed = sorted(k for k in now if k in before and before[k] != now[k] and k not in RESUMABLE_CHANGES)
            if changed:
                raise ValueError(f"--resume with different {', '.join(changed)} than the saved run "
                                 f"({', '.join(f'{k}={before[k]!r}' for k in changed)}); use the same values "
                                 "or start a new --out")
        state = load_checkpoint(found[-1], self.model, self.optimizer)
        self.step = state["step"]
        truncate_metrics(self.run / "metrics.jsonl", self.step)
        print(f"resumed {self.run} at step {self.step} from {found[-1]}")

    def fit(self, step_fn: Callable[[int], dict[str, Any]]) -> FitResult:
        cfg = self.cfg
        self.run.mkdir(parents=True, exist_ok=True)
        (self.run / "config.json").write_text(
            json.dumps({"stage": self.stage, "config": cfg.to_dict()}, indent=2, default=str) + "\n")
        t0 = time.perf_counter()
        status, last_ckpt = "completed", None
        previous = self._install_sigint()
        progress = _Progress(cfg.progress, self.stage, cfg.steps, self.step)
        try:
            with progress, (self.run / "metrics.jsonl").open("a") as log:
                while self.step < cfg.steps:
                    if self._stop_requested:
                        status = "interrupted"
                        break
                    self._current_step = self.step
                    lr = lr_at(cfg, self.step)
                    for g in self.optimizer.param_groups:
                        g["lr"] = lr
                    self.model.train()
                    tuner = self.thread_tuner
                    if tuner is not None:
                        torch.set_num_threads(tuner.next_threads())
                    threads = torch.get_num_threads()
                    ts, cs = time.perf_counter(), time.process_time()
                    metrics = step_fn(self.step)
                    self.step += 1
                    dt = time.perf_counter() - ts
                    if tuner is not None:
                        tuner.observe(threads, dt, metrics.get("tokens", 1))
                    # CPU seconds of this process (all its threads): on a shared machine wall time also
                    # counts other processes' load, CPU time counts only this step's own work.
                    row = {"step": self.step, "time": round(time.perf_counter() - t0, 3), "lr": lr,
                           "step_time": round(dt, 4), "step_cpu_time": round(time.process_time() - cs, 4),
                           "threads": threads, **metrics}
                    if "tokens" in metrics:
                        row["tokens_per_s"] = round(metrics["tokens"] / max(dt, 1e-9), 1)
                    log.write(json.dumps(row) + "\n")
                    log.flush()
                    progress.update(row)
                    if cfg.save_every and self.step % cfg.save_every == 0 and self.step < cfg.steps:
                        last_ckpt = self.save()
            last_ckpt = self.save()
        finally:
            if previous is not None:
                signal.signal(signal.SIGINT, previous)
        if status == "interrupted":
            print(f"interrupted: saved step {self.step} to {last_ckpt}; continue with --resume")
        return FitResult(status, self.step, last_ckpt, time.perf_counter() - t0)

    def save(self) -> Path:
        return save_checkpoint(self.run, self.step, self.model, self.tokenizer, self.optimizer,
                               {"stage": self.stage}, self.cfg.keep_checkpoints,
                               metadata={**self.metadata, "stage": self.stage})

    def _install_sigint(self):
        if threading.current_thread() is not threading.main_thread():
            return None

        def handler(signum, frame):
            if self._stop_requested:  # second Ctrl-C: abort now
                raise KeyboardInterrupt
            self._stop_requested = True
            print("\nCtrl-C: finishing this step and saving a checkpoint (press again to abort)")

        return signal.signal(signal.SIGINT, handler)


# A forward+backward's fixed cost in padded tokens (Python and kernel launches of ~100 ops against
# ~0.17 ms of compute per token on tiny-dense at 1 thread): a step is cut into length groups only
# where that saves more padded tokens than this.
MICRO_BATCH_OVERHEAD_TOKENS = 64


def length_micro_batches(lengths: Sequence[int], grad_accum: int = 1,
                         overhead: int = MICRO_BATCH_OVERHEAD_TOKENS) -> list[list[int]]:
    """Row indices of one step's micro-batches: rows sorted longest first, cut into the length groups
    that minimise padded tokens + `overhead` per group (`length_groups`, the engine's prefill rule),
    and no group larger than len(lengths) / grad_accum rows (--grad-accum bounds a micro-batch's memory).
    Every row is in exactly one micro-batch; within a group rows keep their step order."""
    from qiusuo.engine.model_runner import length_groups

    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    cap = max(1, -(-len(order) // max(1, grad_accum)))
    out, a = [], 0
    for size in length_groups([lengths[i] for i in order], overhead) if order else []:
        group = order[a:a + size]
        a += size
        out.extend(sorted(group[j:j + cap]) for j in range(0, len(group), cap))
    return out


class _Progress:
    """rich progress bar: step, ETA, loss or reward, tokens/s (plain lines when not a terminal)."""

    def __init__(self, enabled: bool, stage: str, total: int, start: int):
        self.enabled, self.stage, self.total, self.start = enabled, stage, total, start
        self.bar = None
        self._last_plain = 0.0

    def __enter__(self):
        if not self.enabled:
            return self
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
            TimeRemainingColumn

        console = Console(stderr=True)
        if console.is_terminal:
            self.bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                                TextColumn("{task.fields[info]}"), console=console)
            self.bar.__enter__()
            self.task = self.bar.add_task(self.stage, total=self.total, completed=self.start, info="")
        return self

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.__exit__(*exc)
        return False

    def update(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        parts = [f"{k} {row[k]:.4g}" for k in ("loss", "reward_mean", "accuracy") if k in row]
        if "tokens_per_s" in row:
            parts.append(f"{row['tokens_per_s']:.0f} tok/s")
        if row.get("sandbox_refusals"):  # every refused completion scored 0: say so where the reward shows
            reasons = ", ".join(f"{k.removeprefix('sandbox_refused/')} {v}" for k, v in row.items()
                                if k.startswith("sandbox_refused/"))
            parts.append(f"sandbox refused {row['sandbox_refusals']} ({reasons})")
        info = "  ".join(parts)
        if self.bar is not None:
            self.bar.update(self.task, completed=row["step"], info=info)
            return
        now = time.perf_counter()  # not a terminal (CI, pipes): one line every ~10 s and at the end
        if now - self._last_plain > 10 or row["step"] == self.total:
            self._last_plain = now
            done = row["step"] - self.start
            eta = (self.total - row["step"]) * row["time"] / max(done, 1)
            print(f"{self.stage} step {row['step']}/{self.total}  {info}  ETA {eta:.0f}s", flush=True)


__all__ = ["Trainer", "FitResult", "NonFiniteLossError", "lr_at", "setup_torch", "autocast_dtype",
           "length_micro_batches"]
