"""circuitlab: activation patching, path patching and circuit discovery on TransformerLens 4 bridges.

The repository's top-level folders install as `circuitlab.patching` (models and the causal engine),
`circuitlab.tasks` (behaviours as prompt pairs), `circuitlab.graphs` (circuits) and `circuitlab.reports`
(command line and reports).
"""

from circuitlab.graphs.discovery import Discovery, discover, evaluate
from circuitlab.graphs.scores import Circuit, EdgeScores, NodeScores
from circuitlab.patching import load_model, save_model
from circuitlab.patching.edges import prepare_edges
from circuitlab.patching.localize import LocalizeResult, localize
from circuitlab.tasks import get_task, list_tasks

__all__ = ["Circuit", "Discovery", "EdgeScores", "LocalizeResult", "NodeScores", "discover", "evaluate", "get_task",
           "list_tasks", "load_model", "localize", "prepare_edges", "save_model"]
