"""The ground-truth adapter of the methods benchmark: a `graphs.groundtruth.GroundTruth` (or any `TaskSpec`) as
the engine's (task, pairs) interface, with the task's, a resampled, or a zero-ablation counterfactual, and the
reference circuit methods are scored against (see `graphs.benchmark`)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from torch import Tensor

from circuitlab.graphs.evaluate import edge_set, node_set
from circuitlab.graphs.groundtruth import GroundTruth, TaskSpec, read_circuit
from circuitlab.graphs.io import from_mib
from circuitlab.patching.components import parse_node
from circuitlab.patching.topology import ComputationalGraph

COUNTERFACTUALS: tuple[str, ...] = ("task", "resample", "zero")

@dataclass(frozen=True)
class Reference:
    """A reference circuit: node names (heads/MLPs; `input`/`logits` ignored) and edge names."""

    nodes: frozenset[str]
    edges: frozenset[str]

    @classmethod
    def from_groundtruth(cls, gt: GroundTruth) -> Reference:
        return cls(frozenset(gt.true_nodes), frozenset(gt.true_edges))

    @classmethod
    def load(cls, path: str | Path) -> Reference:
        """Read a circuit file: our `circuitlab-circuit` JSON (`graphs.groundtruth.write_circuit`) or an
        EAP-IG/MIB circuit JSON (`graphs.io.write_mib`; edges with `in_graph` true)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"reference circuit file {path} does not exist")
        data = json.loads(path.read_text())
        if isinstance(data, dict) and data.get("format") == "circuitlab-circuit":
            circuit = read_circuit(path)
            return cls(frozenset(circuit["nodes"]), frozenset(circuit["edges"]))
        if isinstance(data, dict) and {"cfg", "nodes", "edges"} <= set(data):
            graph = from_mib(data)
            return cls(frozenset(node_set(graph)), frozenset(edge_set(graph)))
        raise ValueError(f"{path}: not a circuit file (expected format 'circuitlab-circuit' or an EAP-IG/MIB "
                         "JSON with cfg/nodes/edges)")

    def checked(self, graph: ComputationalGraph) -> Reference:
        """Canonical names, checking every edge and node exists in the model's graph (errors name the bad one)."""
        edges = frozenset(graph.edge_names[graph.edge_index(e)] for e in self.edges)
        components = set(graph.sender_names) | {"logits"}
        nodes = set()
        for node in self.nodes:
            name = parse_node(node).name
            if name not in components:
                raise ValueError(f"reference node {node!r} is not in this model's graph")
            nodes.add(name)
        if not edges:
            raise ValueError("the reference circuit has no edges")
        return Reference(frozenset(nodes), edges)


@dataclass
class GroundTruthPairs:
    """Clean/corrupt token ids with what the metric reads; the pairs interface of the patching engine."""

    clean_tokens: Tensor  # [B, S]
    corrupt_tokens: Tensor  # [B, S]
    read_pos: Tensor  # [R]
    answer: Tensor  # [B, R]: token ids (logit_diff) or targets (regression)
    wrong: Tensor | None  # [B, R] token ids for logit_diff
    positions: dict[str, Tensor] = field(default_factory=dict)
    attention_mask: Tensor | None = None

    def __len__(self) -> int:
        return int(self.clean_tokens.shape[0])


class GroundTruthTask:
    """A `TaskSpec`'s metric in the engine's task interface (per prompt, any leading batch dimensions)."""

    metric_name = "metric"

    def __init__(self, spec: TaskSpec, name: str = "groundtruth") -> None:
        self.spec, self.name = spec, name
        self.metric_name = "logit_diff" if spec.kind == "logit_diff" else "neg_mse"

    def read_positions(self, pairs: GroundTruthPairs) -> Tensor:
        """Read positions `[B, R]` (every row reads the same positions)."""
        return pairs.read_pos.unsqueeze(0).expand(pairs.clean_tokens.shape[0], -1).contiguous()

    def metric_at(self, logits_at: Tensor, pairs: GroundTruthPairs) -> Tensor:
        """`[..., B, R, V]` logits at the read positions -> per-prompt metric `[..., B]` (mean over R)."""
        if logits_at.ndim < 3:
            raise ValueError(f"expected logits [..., batch, reads, vocab], got shape {tuple(logits_at.shape)}")
        if self.spec.kind == "regression":
            target = pairs.answer.to(logits_at.dtype)
            return -((logits_at[..., 0] - target) ** 2).mean(-1)
        lead = logits_at.shape[:-3]
        answer = pairs.answer.expand(*lead, *pairs.answer.shape).unsqueeze(-1)
        wrong = pairs.wrong.expand(*lead, *pairs.wrong.shape).unsqueeze(-1)
        good = logits_at.gather(-1, answer)[..., 0]
        bad = logits_at.gather(-1, wrong)[..., 0]
        return (good - bad).mean(-1)

    def metric(self, logits: Tensor, pairs: GroundTruthPairs) -> Tensor:
        """Per-prompt metric from full logits `[B, S, V]`."""
        return self.metric_at(logits[:, pairs.read_pos, :], pairs)


def adapt_spec(spec: TaskSpec, n: int, seed: int = 0, *, counterfactual: str = "task",
               name: str = "groundtruth") -> tuple[GroundTruthTask, GroundTruthPairs]:
    """(task, pairs) for the engine from a ground-truth task spec (see the module docstring)."""
    if counterfactual not in COUNTERFACTUALS:
        raise ValueError(f"counterfactual {counterfactual!r} is unknown: use one of {COUNTERFACTUALS}")
    batch = spec.make_pairs(n, seed)
    corrupt, wrong = batch.corrupt, batch.wrong
    if counterfactual == "zero":  # the corrupted inputs are unused: senders are ablated to zero instead
        pass
    elif counterfactual == "resample":
        other = spec.make_pairs(n, seed + 1_000_003)  # an independent draw, reproducible from `seed`
        corrupt = other.clean
        wrong = other.answer if spec.kind == "logit_diff" else None
    pairs = GroundTruthPairs(batch.clean, corrupt, batch.read_pos, batch.answer, wrong)
    return GroundTruthTask(spec, name), pairs


def adapt_groundtruth(gt: GroundTruth, n: int, seed: int = 0, *, counterfactual: str = "task"
                      ) -> tuple[GroundTruthTask, GroundTruthPairs]:
    """(task, pairs) for the engine from a loaded ground-truth model."""
    return adapt_spec(gt.task, n, seed, counterfactual=counterfactual, name=gt.name)
