"""Supervised fine-tuning, and the next-token step it shares with pretraining.

- `CompletionLM`: the step both stages run: `[bos] prompt completion [eos]` rows, loss on the
  completion + eos only, split into `grad_accum` micro-batches, one optimizer step.
- `SFT`: an existing checkpoint on prompt/completion or chat records (cold start; distillation).
  Step s's batch is position s of a seeded permutation per epoch, so `--resume` needs no data state.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from qiusuo.tokenizer import prompt_chat_template

from .config import FinetuneConfig
from .data import completion_row, pad_id, step_seed
from .final import save_final
from .loop import FitResult, Trainer, setup_torch


class CompletionLM:
    """The shared step: a list of (ids, mask) rows -> grad_accum micro-batches -> one optimizer step."""

    trainer: Trainer

    def batch_rows(self, step: int) -> list[tuple[list[int], list[int]]]:
        raise NotImplementedError

    def train_step(self, step: int) -> dict[str, Any]:
        return self.trainer.completion_step(self.batch_rows(step), pad_id(self.tokenizer))


def read_sft_records(path: str | Path, tokenizer, max_length: int) -> list[tuple[list[int], list[int]]]:
    """JSONL records -> training rows. `{"prompt", "completion"}`, or `{"messages": [...]}` whose
    last message is the assistant turn to learn (earlier turns are rendered with the chat template).
    A malformed line raises ValueError naming file and line; records over `max_length` are dropped."""
    from qiusuo.tasks.jsonl import read_jsonl

    rows = [record_row(rec, tokenizer, f"{path}:{n}") for n, rec in read_jsonl(path, required=())]
    kept = [row for row in rows if len(row[0]) <= max_length]
    if not kept:
        raise ValueError(f"{path} has no usable records ({len(rows)} longer than --max-length {max_length})")
    return kept


def has_chat_records(path: str | Path) -> bool:
    """Whether a JSONL file holds chat records (`record_row` renders them with the chat template)."""
    from qiusuo.tasks.jsonl import read_jsonl

    return any("messages" in r and not ("prompt" in r and "completion" in r) for _, r in read_jsonl(path, required=()))


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


class SFT(CompletionLM):
    def __init__(self, cfg: FinetuneConfig, rows: Sequence[tuple[list[int], list[int]]] | None = None,
                 model=None, tokenizer=None, stage: str = "sft", parent: str | None = None):
        """cfg: an SFTConfig, whose --model and --data are read here; or, with `rows`, `model`,
        `tokenizer` and `parent` given (distillation), any FinetuneConfig."""
        from qiusuo.model import load_model

        self.cfg = cfg
        setup_torch(cfg)
        if model is None:
            model, tokenizer = load_model(cfg.model, device=cfg.device)
            parent = parent or cfg.model
        if tokenizer is None:
            raise ValueError(f"{parent} has no tokenizer.json; SFT needs it to encode the records")
        self.model, self.tokenizer = model.train(), tokenizer
        self.rows = list(rows) if rows is not None else read_sft_records(cfg.data, tokenizer, cfg.max_length)
        if rows is None and not has_chat_records(cfg.data):
            # prompt/completion records train on [bos] + prompt: the checkpoint's chat template renders that
            tokenizer.chat_template = prompt_chat_template()
        self.stage, self.parent = stage, parent
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


__all__ = ["CompletionLM", "SFT", "read_sft_records", "record_row"]
