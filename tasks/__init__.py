"""circuitlab.tasks: clean/corrupt prompt pairs with answers and token roles, and per-prompt metrics.

`get_task(name).generate(model_or_tokenizer, n, seed=...)` returns a `PromptPairs`; `task.metric(logits,
pairs)` scores a run per prompt. Tasks: ioi, capitals (capital_lookup), repeated_tokens (induction),
greater_than.
"""

from tasks.base import PAD_ID, PromptPairs, Task, TaskUnsupportedError, gather_at
from tasks.capitals import CapitalsOptions, CapitalsTask
from tasks.greater_than import GreaterThanOptions, GreaterThanTask
from tasks.ioi import IOIOptions, IOITask
from tasks.registry import get_task, list_tasks
from tasks.repeated import RepeatedTokensOptions, RepeatedTokensTask

__all__ = [
    "PAD_ID", "PromptPairs", "Task", "TaskUnsupportedError", "gather_at", "get_task", "list_tasks",
    "IOITask", "IOIOptions", "CapitalsTask", "CapitalsOptions", "RepeatedTokensTask", "RepeatedTokensOptions",
    "GreaterThanTask", "GreaterThanOptions",
]
