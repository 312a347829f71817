"""Ground-truth models for benchmarking circuit discovery: models whose circuit is known by construction.

Committed per model in `graphs/groundtruth/models/<name>/`:
- the model as written by `patching.models.save_model` (`circuitlab-native.json` + `model.safetensors`);
- `circuit.json`: `{"format": "circuitlab-circuit", "version": 1, "model": name, "nodes": [...],
  "edges": [...], "distractors": [...], "derivation": "..."}` with node/edge names of
  `patching.components` (`input`, `a{l}.h{h}`, `m{l}`, `logits`; `a0.h0->a1.h0<k>`); optional
  `inert_structural_edges` (non-zero weights that carry nothing for the task) and `edge_effects`;
- `task.json`: a `TaskSpec` (clean/corrupt token ids, read positions, metric);
- `card.md`: what it computes, how it was built, accuracy measured by the build script, the circuit.

Models: `induction_handwired` (analytic), `tracr_reverse` and `tracr_frac_prevs` (compiled by Tracr, see
`tracr_export.py`), `planted_marker` (trained with SIIT, see `planted.py`). Rebuild with
`python -m graphs.groundtruth.build NAME`.

Edge semantics: see `graphs.groundtruth.verify` (head senders are z @ W_O without b_O; b_O belongs to no
node and is zero in every model here; q/k/v biases belong to their head, the unembedding bias to `logits`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from torch import Tensor
from transformer_lens.model_bridge import TransformerBridge

import networkx as nx
from circuitlab.graphs.circuit import add_edge, finish, new_circuit
from circuitlab.graphs.groundtruth.taskspec import TaskBatch, TaskSpec
from circuitlab.patching.components import parse_edge, parse_node
from circuitlab.patching.models import load_model

MODELS_DIR = Path(__file__).resolve().parent / "models"
CIRCUIT_FORMAT = "circuitlab-circuit"

__all__ = ["GroundTruth", "TaskBatch", "TaskSpec", "list_groundtruth", "load_groundtruth", "read_circuit",
           "write_circuit", "MODELS_DIR"]


@dataclass(frozen=True)
class GroundTruth:
    """A loaded ground-truth model, its true circuit and its task."""

    name: str
    model: TransformerBridge  # TransformerBridge (eval mode, gradients off)
    task: TaskSpec
    true_nodes: frozenset[str]
    true_edges: frozenset[str]
    distractors: tuple[str, ...]
    directory: Path

    def make_pairs(self, n: int, seed: int = 0) -> TaskBatch:
        """`n` clean/corrupt token pairs with answers and read positions (see `TaskSpec.make_pairs`)."""
        return self.task.make_pairs(n, seed)

    def metric(self, logits: Tensor, batch: TaskBatch) -> Tensor:
        """Scalar task metric on full logits [batch, pos, vocab_out]: logit difference or -MSE."""
        return self.task.metric(logits, batch)

    def accuracy(self, logits: Tensor, batch: TaskBatch) -> float:
        return self.task.accuracy(logits, batch)

    def circuit_graph(self) -> nx.MultiDiGraph:
        """The true circuit as a `graphs.circuit` graph (networkx MultiDiGraph; write with `graphs.io`)."""
        graph = new_circuit(name=f"{self.name} (ground truth)", method="ground_truth",
                            n_layers=self.model.cfg.n_layers)
        for edge in sorted(self.true_edges):
            src, dst, channel = parse_edge(edge)
            add_edge(graph, src, dst, channel, score=1.0, method="ground_truth")
        return finish(graph)

    @property
    def card(self) -> str:
        return (self.directory / "card.md").read_text()


def list_groundtruth(models_dir: Path = MODELS_DIR) -> list[str]:
    """Names of the committed ground-truth models."""
    return sorted(p.name for p in models_dir.iterdir() if (p / "circuit.json").is_file())


def read_circuit(path: str | Path) -> dict[str, object]:
    """Read a circuit JSON file, checking its format and that every name parses."""
    data = json.loads(Path(path).read_text())
    if data.get("format") != CIRCUIT_FORMAT:
        raise ValueError(f"{path}: not a {CIRCUIT_FORMAT} file (format={data.get('format')!r})")
    for node in data["nodes"]:
        parse_node(node)
    for edge in data["edges"]:
        parse_edge(edge)
    return data


def write_circuit(path: str | Path, model: str, nodes: set[str], edges: set[str], **extra: object) -> Path:
    """Write a circuit JSON file in our format (sorted names)."""
    data = dict(format=CIRCUIT_FORMAT, version=1, model=model, nodes=sorted(nodes), edges=sorted(edges), **extra)
    Path(path).write_text(json.dumps(data, indent=1) + "\n")
    return Path(path)


def load_groundtruth(name: str, models_dir: Path = MODELS_DIR) -> GroundTruth:
    """Load a committed ground-truth model by name (see `list_groundtruth()`)."""
    folder = models_dir / name
    if not (folder / "circuit.json").is_file():
        raise ValueError(f"unknown ground-truth model {name!r}: choose from {list_groundtruth(models_dir)}")
    circuit = read_circuit(folder / "circuit.json")
    return GroundTruth(name=name, model=load_model(str(folder)), task=TaskSpec.load(folder / "task.json"),
                       true_nodes=frozenset(circuit["nodes"]), true_edges=frozenset(circuit["edges"]),
                       distractors=tuple(circuit.get("distractors", ())), directory=folder)
