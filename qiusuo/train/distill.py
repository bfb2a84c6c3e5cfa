"""Distillation by rejection sampling (R1's route to small models, arXiv 2501.12948 §2.4).

The teacher samples `samples_per_prompt` completions per train-split problem through the engine;
the task's rule-based reward keeps the right and well-formed ones (at most `keep_per_prompt`
distinct texts per problem); the student is fine-tuned on them with the SFT stage. The kept
records are written to RUN/distill_data.jsonl (prompt/completion lines, reusable by `qiusuo sft`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from qiusuo.tasks.prompts import chat_template, prompt_ids

from .config import DistillConfig
from .data import load_task, step_seed
from .loop import FitResult, setup_torch
from .sft import SFT, record_row

DATA_FILE = "distill_data.jsonl"


def rejection_sample(llm, tokenizer, task, problems, samples: int, temperature: float, max_tokens: int,
                     seed: int, keep: int) -> tuple[list[dict[str, str]], dict[str, float]]:
    """Records {prompt, completion} of the correct samples, and the teacher's figures."""
    from qiusuo.engine import SamplingParams

    params = SamplingParams(n=samples, temperature=temperature, max_tokens=max_tokens, seed=seed)
    outs = llm.generate([prompt_ids(tokenizer, task, p) for p in problems], params)
    records, correct, solved = [], 0, 0
    for problem, out in zip(problems, outs):
        texts = [o.text for o in out.outputs]
        scores = task.score_many([problem] * len(texts), texts)
        kept: list[str] = []
        for text, s in zip(texts, scores):
            if s.accuracy == 1.0 and s.format == 1.0:
                correct += 1
                if text not in kept and len(kept) < keep:
                    kept.append(text)
        solved += bool(kept)
        # A chat-template task's records are chat records, rendered with the student's template.
        chat = getattr(task, "template", "") == "chat"
        records += [{"messages": [*problem.messages, {"role": "assistant", "content": t}]} if chat
                    else {"prompt": problem.prompt, "completion": t} for t in kept]
    n = max(1, len(problems) * samples)
    return records, {"teacher_accuracy": correct / n, "problems_solved": solved / max(1, len(problems)),
                     "records": len(records)}


class Distill:
    def __init__(self, cfg: DistillConfig, task: Any = None):
        self.cfg = cfg
        setup_torch(cfg)
        self.task = load_task(task if task is not None else cfg.task, cfg.template)

    def records(self) -> list[dict[str, str]]:
        cfg = self.cfg
        path = Path(cfg.out) / DATA_FILE
        if cfg.resume and path.exists():  # the same teacher and seed would give the same data
            return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        from qiusuo.engine import LLM

        teacher = LLM(cfg.teacher, device=cfg.device)
        seed = step_seed(cfg.seed, 0xD157)
        problems = self.task.generate(cfg.num_prompts, seed=seed, split="train")
        records, stats = rejection_sample(teacher, teacher.get_tokenizer(), self.task, problems,
                                          cfg.samples_per_prompt, cfg.temperature, cfg.max_tokens, seed,
                                          cfg.keep_per_prompt)
        print(f"teacher: {stats['teacher_accuracy']:.1%} of samples right, {stats['problems_solved']:.1%} of "
              f"problems solved, {stats['records']} records kept")
        if not records:
            raise ValueError("the teacher solved none of the problems, so there is nothing to distill; use a "
                             "stronger --teacher, more --samples-per-prompt, or an easier task")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
        return records

    def run(self) -> FitResult:
        from qiusuo.model import load_model

        cfg = self.cfg
        model, tokenizer = load_model(cfg.student, device=cfg.device)
        if tokenizer is None:
            raise ValueError(f"--student {cfg.student} has no tokenizer.json")
        tokenizer.chat_template = chat_template(self.task, tokenizer)  # checkpoints render prompts as trained
        records = self.records()
        rows = [row for row in (record_row(r, tokenizer) for r in records) if len(row[0]) <= cfg.max_length]
        if not rows:
            raise ValueError(f"all {len(records)} teacher records are longer than --max-length {cfg.max_length} "
                             "tokens; raise --max-length")
        sft = SFT(cfg, rows=rows, model=model, tokenizer=tokenizer, stage="distill", parent=cfg.student)
        sft.trainer.metadata["teacher"] = cfg.teacher
        return sft.run()


__all__ = ["Distill", "rejection_sample"]
