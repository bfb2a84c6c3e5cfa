"""How a task's problem becomes the prompt a model is trained, evaluated and served on: one place.

Every stage that trains on a task's problems (pretrain, GRPO, distill) and `qiusuo eval` encode a
problem's prompt with `prompt_ids`, and every checkpoint such a stage writes carries
`chat_template(task, tokenizer)`: the chat template under which the user message
`user_message(task, problem)` renders to exactly those ids. So `LLM.chat`, `qiusuo chat`,
`/v1/chat/completions` and the raw prompt through `/v1/completions` all give the model the prompt it
was trained on, and the same answer. Per task template:

- "compact": the prompt is the bare question (`347+285=`), no role markers. The chat template
  renders the user's message as is after bos: the user sends `347+285=`.
- "r1": R1-Zero's template ("A conversation between User and Assistant. ... User: prompt.
  Assistant:", R1 paper Table 1) is itself the chat format: the user sends the question.
- "chat": the task's messages are rendered with the tokenizer's own chat template, which the
  checkpoint keeps.

With `think_in_prompt` the generation prompt ends with `<think>`, so the reply starts inside the
think block (the reasoning splitter sees that from the prompt's ids).
"""

from __future__ import annotations

from typing import Any

from qiusuo.rewards.format import THINK_OPEN
from qiusuo.tokenizer import bos_prompt_ids, prompt_chat_template

from .base import R1_TEMPLATE, Problem, Task


def _template(task: Task) -> str:
    # A duck-typed task (any object with generate/score_many) gives its prompts as raw text.
    return getattr(task, "template", "compact")


def _think_in_prompt(task: Task) -> bool:
    return bool(getattr(task, "think_in_prompt", False))


def prompt_ids(tokenizer: Any, task: Task, problem: Problem) -> list[int]:
    """The token ids of a problem's prompt: [bos] + prompt text, or the chat-rendered messages."""
    if _template(task) == "chat":
        return tokenizer.encode(tokenizer.apply_chat_template(problem.messages, add_generation_prompt=True))
    return bos_prompt_ids(tokenizer, problem.prompt)


def user_message(task: Task, problem: Problem) -> str:
    """What a chat client sends for `problem`: under `chat_template(task, ...)` it renders as `prompt_ids`."""
    if _template(task) == "chat":
        return problem.messages[-1]["content"]
    if _template(task) == "r1":
        return task.instruction(problem.question, problem.metadata)
    prompt = problem.prompt
    return prompt[: -len(THINK_OPEN)] if _think_in_prompt(task) and prompt.endswith(THINK_OPEN) else prompt


def chat_template(task: Task, tokenizer: Any) -> str | None:
    """The chat template a checkpoint trained on `task`'s prompts must carry (see the module docstring)."""
    if _template(task) == "chat":
        return tokenizer.chat_template
    generation = THINK_OPEN if _think_in_prompt(task) else ""
    if _template(task) == "r1":
        prefix, _, suffix = R1_TEMPLATE.partition("{question}")
        return prompt_chat_template(prefix, suffix, generation, sentence=True)
    return prompt_chat_template(generation_prompt=generation)


__all__ = ["prompt_ids", "user_message", "chat_template"]
