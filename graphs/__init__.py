"""circuitlab.graphs: circuits as NetworkX graphs, measured head roles, reference circuits, evaluation, I/O.

- `graphs.circuit`: build circuits from node scores, edge scores or path-patching results (`Selection`).
- `graphs.roles`: role detectors (previous-token, duplicate-token, induction + OV copying, name movers,
  negative and backup name movers, S-inhibition), `detect_roles` (all a model and task allow) and
  `assign_roles`; `graphs.role_scores`: the per-head measurements behind them.
- `graphs.reference`: the published GPT-2-small IOI and greater-than circuits, as data.
- `graphs.evaluate`: precision/recall/F1 and ROC-AUC against a reference; faithfulness, completeness,
  minimality of node circuits.
- `graphs.io`: GraphML, node-link JSON and EAP-IG/MIB JSON; `graphs.draw`: matplotlib drawings.
- `graphs.leaderboard`: one `bench leaderboard` cell (held-out CPR/CMD, smallest circuits in band, Jaccard
  stability, cost); `graphs.mib`: MIB circuit-track submissions of whole-graph edge scores, and their import.
"""

from circuitlab.graphs.circuit import (Selection, circuit_from_edge_scores, circuit_from_node_scores,
                            circuit_from_path_patching, circuit_table, edge_names, validate_circuit)
from circuitlab.graphs.evaluate import (compare_edges, compare_nodes, completeness, edge_score_auroc, faithfulness,
                             minimality, node_score_auroc, roc_auc)
from circuitlab.graphs.io import read_graphml, read_json, read_mib, write_graphml, write_json, write_mib
from circuitlab.graphs.reference import reference_circuit, reference_classes
from circuitlab.graphs.roles import RoleThresholds, assign_roles

__all__ = [
    "Selection", "circuit_from_edge_scores", "circuit_from_node_scores", "circuit_from_path_patching",
    "circuit_table", "edge_names", "validate_circuit", "compare_edges", "compare_nodes", "completeness",
    "edge_score_auroc", "faithfulness", "minimality", "node_score_auroc", "roc_auc", "read_graphml",
    "read_json", "read_mib", "write_graphml", "write_json", "write_mib", "reference_circuit",
    "reference_classes", "RoleThresholds", "assign_roles",
]
