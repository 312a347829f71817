"""circuitlab.tasks: clean/corrupt prompt pairs with answers and token roles, and per-prompt metrics.

`get_task(name).generate(model_or_tokenizer, n, seed=...)` returns a `PromptPairs`; `task.metric(logits,
pairs)` scores a run per prompt. Tasks: ioi, capitals (capital_lookup), repeated_tokens (induction),
greater_than; and your own data: `load_task("pairs.jsonl")` or `from_records([...])` (schema:
`circuitlab.tasks.records`). Counterfactual base/source pairs for interchange interventions come from each task's
causal model (`tasks.causal.causal_model("ioi").counterfactuals(...)`) or a file (`tasks.counterfactual`).
"""

from circuitlab.tasks.base import PAD_ID, PromptPairs, Task, TaskUnsupportedError, gather_at
from circuitlab.tasks.custom import RecordsTask, from_records, load_task
from circuitlab.tasks.records import DataError
from circuitlab.tasks.capitals import CapitalsOptions, CapitalsTask
from circuitlab.tasks.greater_than import GreaterThanOptions, GreaterThanTask
from circuitlab.tasks.ioi import IOIOptions, IOITask
from circuitlab.tasks.registry import get_task, list_tasks
from circuitlab.tasks.repeated import RepeatedTokensOptions, RepeatedTokensTask

__all__ = [
    "PAD_ID", "PromptPairs", "Task", "TaskUnsupportedError", "gather_at", "get_task", "list_tasks",
    "IOITask", "IOIOptions", "CapitalsTask", "CapitalsOptions", "RepeatedTokensTask", "RepeatedTokensOptions",
    "GreaterThanTask", "GreaterThanOptions", "RecordsTask", "DataError", "from_records", "load_task",
]
