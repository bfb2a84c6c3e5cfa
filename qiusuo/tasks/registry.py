"""The task registry: `register` a Task class under its `name`, `get` one by name with options.

Built-in tasks register themselves when `qiusuo.tasks` is imported; user tasks do the same with
the decorator:

    @qiusuo.tasks.register
    class MyTask(qiusuo.tasks.Task):
        name = "my_task"
        ...
"""

from __future__ import annotations

from qiusuo.tasks.base import Task

_TASKS: dict[str, type[Task]] = {}


def register(cls: type[Task]) -> type[Task]:
    """Class decorator: make `cls` available as `get(cls.name)`."""
    if not (isinstance(cls, type) and issubclass(cls, Task)):
        raise ValueError(f"register expects a subclass of qiusuo.tasks.Task, got {cls!r}")
    if not cls.name:
        raise ValueError(f"{cls.__name__} needs a class attribute `name` to be registered")
    existing = _TASKS.get(cls.name)
    if existing is not None and existing.__qualname__ != cls.__qualname__:
        raise ValueError(f"a task named {cls.name!r} is already registered ({existing.__qualname__}); "
                         f"choose another name")
    _TASKS[cls.name] = cls
    return cls


def names() -> list[str]:
    """Names of all registered tasks, sorted."""
    return sorted(_TASKS)


def get(name: str, **options) -> Task:
    """A task instance: `get("arithmetic", digits=4, template="compact")`."""
    if name not in _TASKS:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(names())}")
    return _TASKS[name](**options)
