"""Pretraining: a fresh model on a task's synthetic corpus of worked solutions.

The model is a preset or a config.json with random weights. The mix is the R1-Zero
miniature's key design: a share of "direct" traces (`<think></think><answer>632</answer>`,
right answer, no work shown: a tiny model mostly gets these wrong) and scratchpad traces, some
with one propagated slip, so the base model is right only part of the time, for a reason RL can
fix. Step s's batch is drawn from the task with `step_seed(seed, s)`, so `--resume` needs no
data state. The step itself is SFT's (`sft.CompletionLM`).
"""

from __future__ import annotations

from typing import Any

from qiusuo.tasks.base import BLURTS
from qiusuo.tasks.prompts import chat_template
from qiusuo.tasks.prompts import prompt_ids as task_prompt_ids

from .config import PretrainConfig
from .data import completion_row, load_task, step_seed
from .final import save_final
from .loop import FitResult, Trainer, setup_torch
from .sft import CompletionLM


class Pretrain(CompletionLM):
    def __init__(self, cfg: PretrainConfig, task: Any = None):
        from qiusuo.model import build_model

        self.cfg = cfg
        setup_torch(cfg)
        self.task = load_task(task if task is not None else cfg.task, cfg.template)
        if not getattr(self.task, "solution_styles", ()):
            raise ValueError(f"task {self.task.name!r} has no worked solutions to pretrain on; "
                             "pretrain on a built-in generator task (e.g. arithmetic) or use `qiusuo sft`")
        self.mix = self.task.solution_mix(cfg.p_direct, cfg.p_slip, cfg.blurt)  # the objective's mix
        # the rows drawn: --blurt-rows of them blurts, each weighted so that the objective keeps self.mix
        self.row_mix = self.mix if cfg.blurt_rows is None else self.task.solution_mix(cfg.blurt_rows, cfg.p_slip,
                                                                                       cfg.blurt)
        self.blurt_weight = cfg.blurt_weight()
        self.levels = cfg.difficulty_levels()
        self.task.corpus(1, seed=0, mix=self.row_mix, difficulty=self.levels)  # validates mix and levels before step 1
        self.model, self.tokenizer = build_model(cfg.preset, seed=cfg.seed)
        # Every checkpoint renders chat prompts exactly as this stage encodes the task's prompts.
        self.tokenizer.chat_template = chat_template(self.task, self.tokenizer)
        self.model.to(cfg.device)
        self.trainer = Trainer(cfg, self.model, self.tokenizer, "pretrain",
                               metadata={"preset": cfg.preset, "task": self.task.name, "mix": self.mix,
                                         "row_mix": self.row_mix, "blurt_weight": self.blurt_weight})

    def batch_rows(self, step: int):
        examples = self.task.styled_corpus(self.cfg.batch_size, seed=step_seed(self.cfg.seed, step),
                                           mix=self.row_mix, difficulty=self.levels)
        rows = []
        for p, style, c in examples:
            ids, mask = completion_row(self.tokenizer, task_prompt_ids(self.tokenizer, self.task, p), c)
            if style in BLURTS and self.blurt_weight != 1.0:
                mask = [self.blurt_weight * m for m in mask]
            rows.append((ids, mask))
        return rows

    def run(self) -> FitResult:
        self.trainer.resume_if_asked()
        result = self.trainer.fit(self.train_step)
        if result.status == "completed":
            save_final(self.trainer, "pretrain", parent=None)
        return result


__all__ = ["Pretrain"]
