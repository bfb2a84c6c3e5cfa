"""Pretraining and supervised fine-tuning: next-token loss on completion tokens, one loop.

- `Pretrain`: a fresh model (preset or config.json) on a task's synthetic corpus of worked
  solutions. The mix is the miniature's key design (reference/r1-zero-miniature.md): a share of
  "direct" traces (`<think></think><answer>632</answer>`, right answer, no work shown: a tiny
  model mostly gets these wrong) and scratchpad traces, some with one propagated slip, so the
  base model is right only part of the time, for a reason RL can fix.
- `SFT`: an existing checkpoint on prompt/completion or chat records (cold start; distillation).

Both train on `[bos] prompt completion [eos]` with the loss on completion + eos only. Step s's
batch is a pure function of (seed, s): pretraining draws it from the task with `step_seed`,
SFT walks a seeded permutation per epoch; so `--resume` needs no data state.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .config import PretrainConfig, SFTConfig
from .data import completion_row, load_task, pad_id, step_seed
from .grpo import save_final
from .loop import FitResult, Trainer, setup_torch


class _CompletionLM:
    """The shared step: a list of (ids, mask) rows -> grad_accum micro-batches -> one optimizer step."""

    trainer: Trainer

    def batch_rows(self, step: int) -> list[tuple[list[int], list[int]]]:
        raise NotImplementedError

    def train_step(self, step: int) -> dict[str, Any]:
        return self.trainer.completion_step(self.batch_rows(step), pad_id(self.tokenizer))


class Pretrain(_CompletionLM):
    def __init__(self, cfg: PretrainConfig, task: Any = None):
        from qiusuo.model import build_model

        self.cfg = cfg
        setup_torch(cfg)
        self.task = load_task(task if task is not None else cfg.task, cfg.template)
        if not getattr(self.task, "solution_styles", ()):
            raise ValueError(f"task {self.task.name!r} has no worked solutions to pretrain on; "
                             "pretrain on a built-in generator task (e.g. arithmetic) or use `qiusuo sft`")
        self.mix = self.task.solution_mix(cfg.p_direct, cfg.p_slip, cfg.blurt)
        self.task.corpus(1, seed=0, mix=self.mix)  # validates the mix against the task before step 1
        self.model, self.tokenizer = build_model(cfg.preset, seed=cfg.seed)
        self.model.to(cfg.device)
        self.trainer = Trainer(cfg, self.model, self.tokenizer, "pretrain",
                               metadata={"preset": cfg.preset, "task": self.task.name, "mix": self.mix})

    def batch_rows(self, step: int):
        pairs = self.task.corpus(self.cfg.batch_size, seed=step_seed(self.cfg.seed, step), mix=self.mix)
        return [completion_row(self.tokenizer, p.prompt, c) for p, c in pairs]

    def run(self) -> FitResult:
        self.trainer.resume_if_asked()
        result = self.trainer.fit(self.train_step)
        if result.status == "completed":
            save_final(self.trainer, "pretrain", parent=None)
        return result


def read_sft_records(path: str | Path, tokenizer, max_length: int) -> list[tuple[list[int], list[int]]]:
    """JSONL records -> training rows. `{"prompt", "completion"}`, or `{"messages": [...]}` whose
    last message is the assistant turn to learn (earlier turns are rendered with the chat template)."""
    rows, skipped = [], 0
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n} is not valid JSON ({e}); one JSON object per line") from None
        rows_or_none = record_row(rec, tokenizer, f"{path}:{n}")
        if len(rows_or_none[0]) > max_length:
            skipped += 1
            continue
        rows.append(rows_or_none)
    if not rows:
        raise ValueError(f"{path} has no usable records ({skipped} longer than --max-length {max_length})")
    return rows


def record_row(rec: dict, tokenizer, where: str = "record") -> tuple[list[int], list[int]]:
    if "prompt" in rec and "completion" in rec:
        return completion_row(tokenizer, str(rec["prompt"]), str(rec["completion"]))
    messages = rec.get("messages")
    if not messages or messages[-1].get("role") != "assistant":
        raise ValueError(f"{where}: a record needs 'prompt' and 'completion', or 'messages' ending with an "
                         "assistant turn")
    prompt = tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True)
    p = tokenizer.encode(prompt)  # the template writes its own bos
    c = tokenizer.encode(str(messages[-1]["content"])) + [tokenizer.eos_token_id]
    return p + c, [0] * len(p) + [1] * len(c)


class SFT(_CompletionLM):
    def __init__(self, cfg: SFTConfig, rows: Sequence[tuple[list[int], list[int]]] | None = None,
                 model=None, tokenizer=None, stage: str = "sft", parent: str | None = None):
        from qiusuo.model import load_model

        self.cfg = cfg
        setup_torch(cfg)
        if model is None:
            model, tokenizer = load_model(cfg.model, device=cfg.device)
        if tokenizer is None:
            raise ValueError(f"{cfg.model} has no tokenizer.json; SFT needs it to encode the records")
        self.model, self.tokenizer = model.train(), tokenizer
        self.rows = list(rows) if rows is not None else read_sft_records(cfg.data, tokenizer, cfg.max_length)
        self.stage, self.parent = stage, parent or cfg.model
        self.trainer = Trainer(cfg, model, tokenizer, stage, metadata={"parent": self.parent})

    def batch_rows(self, step: int):
        B, n = self.cfg.batch_size, len(self.rows)
        out = []
        for i in range(step * B, (step + 1) * B):  # position i of the endless stream of epochs
            epoch, j = divmod(i, n)
            out.append(self.rows[self._permutation(epoch)[j]])
        return out

    def _permutation(self, epoch: int) -> np.ndarray:
        if getattr(self, "_perm_epoch", None) != epoch:
            self._perm_epoch = epoch
            self._perm = np.random.default_rng(step_seed(self.cfg.seed, epoch)).permutation(len(self.rows))
        return self._perm

    def run(self) -> FitResult:
        self.trainer.resume_if_asked()
        result = self.trainer.fit(self.train_step)
        if result.status == "completed":
            save_final(self.trainer, self.stage, parent=self.parent)
        return result


__all__ = ["Pretrain", "SFT", "read_sft_records", "record_row"]
