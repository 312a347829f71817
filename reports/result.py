"""`RunResult`: everything one `circuitlab run` measured, in memory, typed.

The stages of `reports.run` fill it; `reports.save` writes it to disk and reads it back; `reports.render`
turns it into HTML and Markdown. Tables are tidy DataFrames with real dtypes (bools stay bools):

| field          | rows                                                                    | from stage    |
|----------------|-------------------------------------------------------------------------|---------------|
| `baseline`     | one per prompt: `prompt`, `clean`, `corrupt` metric                      | baseline      |
| `nodes`        | one per head/MLP: the method's node scores (`graphs.scores.NODE_COLUMNS`) | scores        |
| `edges`        | one per graph edge: the method's edge scores (edge methods only)         | scores        |
| `exact`        | exact activation patching (denoising) of every head and MLP             | exact         |
| `resid`        | exact patching of the residual stream, layer × position                  | resid         |
| `oracle`       | sampled edges re-scored by exact edge patching                          | oracle        |
| `faithfulness` | the top-k% faithfulness curve (signed and absolute selection)           | faithfulness  |
| `roles`        | measured head roles (`graphs.roles.ROLE_COLUMNS`)                        | roles         |
| `faithful_curve` | exact faithfulness vs circuit size, discovery and held-out, per ranking | circuit       |
| `faithful_ranking` | the circuit method's ranking (item, score)                           | circuit       |
| `stability`    | inclusion frequency of each component over bootstrap resamples           | circuit       |
| `circuit_prompts` | the chosen node circuit's metric on each discovery prompt              | circuit       |
| `attention`    | the circuit heads' attention patterns on the first discovery prompts (clean) | after roles |

`model` is the measured model's record (`reports.summaries.ModelRecord`, run.json `model`: shape, engine, how the
held-out pairs were split); `heldout_pairs` are the held-out prompt pairs (templates the discovery `pairs` do not
use); `faithful` the circuit stage's summary (`reports.faithful.circuit_stage`), written to run.json as
`circuit_faithfulness`. With --validation-n, `validation_pairs` are the pairs the circuit's size is chosen on
(templates neither other set uses) and `prompt_split` says how the prompts were split (run.json `split`); both
are None otherwise.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import platform
import sys
from dataclasses import dataclass, field

import networkx as nx
import numpy as np
import pandas as pd
from typing import Mapping

from circuitlab.patching.attribution import spearman
from circuitlab.patching.methods import get_method
from circuitlab.patching.stats import bootstrap_ci
from circuitlab.reports.config import RunConfig
from circuitlab.tasks.base import PromptPairs
from circuitlab.reports.summaries import (
    SUMMARY_TYPES, AcdcSummary, CircuitSummary, FaithfulnessSummary, ModelRecord, OracleSummary, SplitSummary, Summary,
)
from circuitlab.patching.components import node_kind

TABLES = ("baseline", "nodes", "edges", "exact", "resid", "oracle", "faithfulness", "roles", "faithful_curve",
          "faithful_ranking", "stability", "circuit_prompts", "attention")
SCORE_COLUMNS = ["component", "node", "layer", "head", "position", "role", "edge", "sender", "receiver",
                 "channel", "method", "exact", "metric", "effect", "score"]


@dataclass
class RunResult:
    """One run's results (see the module docstring); `None` marks what was not computed."""

    config: RunConfig
    task: dict[str, object] = field(default_factory=dict)
    model: ModelRecord | None = None
    pairs: PromptPairs | None = None
    heldout_pairs: PromptPairs | None = None
    validation_pairs: PromptPairs | None = None
    baseline: pd.DataFrame | None = None
    nodes: pd.DataFrame | None = None
    edges: pd.DataFrame | None = None
    exact: pd.DataFrame | None = None
    resid: pd.DataFrame | None = None
    oracle: pd.DataFrame | None = None
    faithfulness: pd.DataFrame | None = None
    roles: pd.DataFrame | None = None
    faithful_curve: pd.DataFrame | None = None
    faithful_ranking: pd.DataFrame | None = None
    stability: pd.DataFrame | None = None
    circuit_prompts: pd.DataFrame | None = None
    attention: pd.DataFrame | None = None
    faithful: CircuitSummary | None = None
    oracle_summary: OracleSummary | None = None
    faithfulness_summary: FaithfulnessSummary | None = None
    acdc_summary: AcdcSummary | None = None
    prompt_split: SplitSummary | None = None
    circuit: nx.MultiDiGraph | None = None
    timings: dict[str, float] = field(default_factory=dict)
    resumed: list[str] = field(default_factory=list)
    info: dict[str, object] = field(default_factory=dict)  # run.json extras: command, versions, wall time, ...

    def update(self, values: dict[str, object]) -> None:
        """Set fields from a stage's output, refusing unknown names; a summary read back from JSON (the stage
        cache, run.json) becomes its typed summary again."""
        names = {f.name for f in dataclasses.fields(self)}
        for key, value in values.items():
            if key not in names:
                raise KeyError(f"RunResult has no field {key!r}")
            if key in SUMMARY_TYPES and isinstance(value, Mapping):
                value = SUMMARY_TYPES[key].from_dict(value)
            setattr(self, key, value)

    # ------------------------------------------------------------------ derived views
    def metrics(self) -> dict[str, object]:
        """Clean and corrupt metric means with 95% bootstrap intervals (prompts resampled)."""
        clean = self.baseline["clean"].to_numpy(float)
        corrupt = self.baseline["corrupt"].to_numpy(float)
        seed = self.config.seed
        return {"metric": self.task.get("metric", ""),
                "clean": float(clean.mean()), "clean_ci": bootstrap_ci(clean, seed=seed),
                "corrupt": float(corrupt.mean()), "corrupt_ci": bootstrap_ci(corrupt, seed=seed),
                "difference": float((clean - corrupt).mean()),
                "difference_ci": bootstrap_ci(clean - corrupt, seed=seed),
                "fraction_clean_above_corrupt": float((clean > corrupt).mean())}

    def node_agreement(self) -> dict[str, object]:
        """Spearman rank agreement of the method's node effects with exact activation patching."""
        if self.exact is None:  # --positions none: no exact patching to compare with
            return {"compared_with": None, "spearman": None, "n_nodes": 0}
        exact = strongest_per_node(self.exact).set_index("node")["effect"]
        if self._exact_nodes() or self.nodes is None:  # an exact node method is exact patching itself
            return {"compared_with": None, "spearman": None, "n_nodes": int(len(exact))}
        approx = self.nodes.set_index("node")["effect"]
        common = exact.index.intersection(approx.index)
        return {"compared_with": self.config.method, "spearman": spearman(exact[common], approx[common]),
                "n_nodes": int(len(common))}

    def _exact_nodes(self) -> bool:
        """Whether the run's method scores nodes by exact patching (its node rows are the exact rows)."""
        spec = get_method(self.config.method)
        return spec.exact and spec.level == "node"

    def scores_table(self) -> pd.DataFrame:
        """scores.csv: exact head/MLP rows, the method's node rows, edge rows, residual-stream rows. `position` is
        the position patched (a negative one counts from each prompt's end); empty for all positions at once, a
        role's per-prompt positions (see `role`) and rows with no position (node and edge scores)."""
        parts = []
        if self.exact is not None:
            parts.append(self.exact.assign(method="activation", exact=True))
        if self.nodes is not None and not self._exact_nodes():
            parts.append(self.nodes.assign(position=pd.NA, role="", metric=np.nan))  # no position: written empty
        if self.edges is not None:
            parts.append(self.edges.assign(component="edge", node="", layer=-1, head=-1, position=pd.NA, role="",
                                           exact=get_method(self.config.method).exact, metric=np.nan))
        if self.resid is not None:
            parts.append(self.resid.assign(node="", method="activation", exact=True))
        frame = pd.concat([p for p in parts if not p.empty], ignore_index=True)
        for col in SCORE_COLUMNS:
            if col not in frame.columns:
                frame[col] = ""
        for col in ("node", "role", "edge", "sender", "receiver", "channel"):
            frame[col] = frame[col].fillna("").astype(str)
        frame["position"] = frame["position"].astype("Int64")  # empty = all positions, a role's, or none
        extra = [c for c in frame.columns if c not in SCORE_COLUMNS and c not in ("direction", "source")]
        return frame[SCORE_COLUMNS + extra]

    def circuit_size(self) -> dict[str, int]:
        """The run's circuit's heads, MLPs and edges: the circuit stage's own count when its circuit is the run's
        (no size forced by --top-k/--top-fraction/--threshold), else the selected graph's (`input`/`logits` aside)."""
        cfg = self.config
        if self.faithful is not None and all(x is None for x in (cfg.top_k, cfg.top_fraction, cfg.threshold)):
            return dataclasses.asdict(self.faithful.sizes)
        kinds = [node_kind(n) for n in self.circuit.nodes]
        return {"heads": kinds.count("head"), "mlps": kinds.count("mlp"), "edges": self.circuit.number_of_edges()}

    def record(self) -> dict[str, object]:
        """run.json: configuration, task, model, metrics, summaries, timings and provenance."""
        cfg = self.config
        out = {"command": self.info.get("command", cfg.command()), "config": cfg.to_dict(),
               "config_key": cfg.result_key(), "seed": cfg.seed, "task": self.task, "model": _as_dict(self.model),
               "versions": self.info.get("versions") or versions(), "metrics": self.metrics(),
               "n_pairs": int(len(self.baseline)),
               "circuit": self.circuit_size(),
               "node_agreement": self.node_agreement(), "oracle": _as_dict(self.oracle_summary),
               "faithfulness": _as_dict(self.faithfulness_summary), "circuit_faithfulness": _as_dict(self.faithful),
               "timings": {k: round(v, 3) for k, v in self.timings.items()}, "resumed_stages": list(self.resumed)}
        if self.acdc_summary is not None:
            out["acdc"] = self.acdc_summary.to_dict()
        if self.prompt_split is not None:
            out["split"] = self.prompt_split.to_dict()
        out.update({k: v for k, v in self.info.items() if k not in ("command", "versions")})
        return out


def _as_dict(summary: Summary | None) -> dict[str, object] | None:
    return None if summary is None else summary.to_dict()


def strongest_per_node(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per node: the row of largest |effect| (per-position sweeps reduce to their strongest position)."""
    order = frame["effect"].abs().sort_values(ascending=False, kind="stable").index
    return frame.loc[order].drop_duplicates("node")


def versions() -> dict[str, str]:
    """Versions of Python and the packages a run's numbers depend on."""
    out = {"python": platform.python_version()}
    for pkg in ("circuitlab", "torch", "transformer-lens", "transformers", "numpy", "pandas", "networkx",
                "matplotlib"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def platform_info() -> dict[str, str]:
    return {"python": sys.version.split()[0], "machine": platform.machine(), "system": platform.system()}


__all__ = ["RunResult", "SCORE_COLUMNS", "TABLES", "platform_info", "strongest_per_node", "versions"]
