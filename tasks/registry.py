"""Task lookup by name: `get_task("ioi")`, `list_tasks()`."""

from __future__ import annotations


from circuitlab.tasks.base import Task
from circuitlab.tasks.capitals import CapitalsTask
from circuitlab.tasks.custom import load_task, looks_like_path
from circuitlab.tasks.greater_than import GreaterThanTask
from circuitlab.tasks.ioi import IOITask
from circuitlab.tasks.repeated import RepeatedTokensTask

_TASKS: dict[str, type[Task]] = {
    "ioi": IOITask,
    "capitals": CapitalsTask,
    "repeated_tokens": RepeatedTokensTask,
    "greater_than": GreaterThanTask,
}
_ALIASES: dict[str, str] = {
    "capital_lookup": "capitals",
    "induction": "repeated_tokens",
    "greater-than": "greater_than",
    "repeated-tokens": "repeated_tokens",
}


def list_tasks() -> list[str]:
    """Canonical names of the known tasks (aliases: capital_lookup → capitals, induction → repeated_tokens)."""
    return list(_TASKS)


def get_task(name: str, **kwargs: object) -> Task:
    """A new task instance by name or alias, or a dataset file (`.jsonl`/`.csv`, see `load_task`); keyword
    arguments go to its constructor (e.g. `metric=`)."""
    if looks_like_path(str(name)):
        return load_task(name, **kwargs)
    key = str(name).strip().lower()
    key = _ALIASES.get(key, key)
    if key not in _TASKS:
        known = ", ".join(list(_TASKS) + [f"{a} (= {t})" for a, t in _ALIASES.items()])
        raise ValueError(f"unknown task {name!r}: known tasks are {known}")
    return _TASKS[key](**kwargs)
