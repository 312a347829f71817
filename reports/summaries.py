"""The typed summaries a run's stages hand on (`RunResult` fields), and their run.json form.

A stage returns these, later stages and the report read their attributes, and only run.json and the stage cache
hold them as JSON objects (`to_dict`, field names as keys; `from_dict` reads them back, lists as tuples).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Mapping, TypeVar

from circuitlab.graphs.faithful import CircuitSize

S = TypeVar("S", bound="Summary")


def _plain(value: object) -> object:
    """A JSON-ready value: dataclasses as dicts, tuples as lists."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _tuples(value: object) -> object:
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


class Summary:
    """Dataclass summaries written to run.json as JSON objects."""

    def to_dict(self) -> dict[str, object]:
        out = _plain(self)
        assert isinstance(out, dict)
        return out

    @classmethod
    def from_dict(cls: type[S], data: Mapping[str, object]) -> S:
        """The summary of a JSON object written by `to_dict` (keys it does not know are ignored)."""
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        return cls(**{k: _tuples(v) for k, v in data.items() if k in names})


@dataclass(frozen=True)
class OracleSummary(Summary):
    """The oracle stage: Spearman rho of approximate vs exact scores on `n_edges` sampled edges."""

    spearman: float | None
    n_edges: int


@dataclass(frozen=True)
class FaithfulnessSummary(Summary):
    """The faithfulness stage: CPR and CMD of the top-k% curve, with 95% bootstrap intervals."""

    cpr: float | None
    cpr_ci: tuple[float | None, float | None]
    cmd: float | None
    cmd_ci: tuple[float | None, float | None]


@dataclass(frozen=True)
class AcdcSummary(Summary):
    """ACDC's run: the threshold and how many edges it kept."""

    threshold: float
    kept_edges: int


@dataclass(frozen=True)
class BaselineSummary(Summary):
    """The baseline circuit: the smallest top-k heads by single exact effect reaching the target."""

    ranking: str
    heads: int
    reached: bool
    discovery: float | None
    discovery_ci: tuple[float | None, float | None]
    heldout: float | None
    heldout_ci: tuple[float | None, float | None]
    candidates: int


@dataclass(frozen=True)
class SplitSummary(Summary):
    """How a run with --validation-n split its prompts (`how`), how many pairs each part has, and the templates
    of each part (pairwise disjoint)."""

    how: str
    discovery: int
    validation: int
    heldout: int
    discovery_templates: tuple[str, ...]
    validation_templates: tuple[str, ...]
    heldout_templates: tuple[str, ...]


@dataclass(frozen=True)
class CircuitSummary(Summary):
    """The circuit stage's circuit (`reports.faithful.circuit_stage`): the circuit search (`method`) and how the
    report names its ranking, the items kept at `level` (node or edge), its exact faithfulness on the discovery
    and held-out pairs with 95% intervals against `target`, its size, the baseline, and how it was measured.
    With --validation-n, `validation`/`validation_ci` are its faithfulness on the `n_validation` validation pairs
    its size was chosen on (`graphs.selection.select_validated`); without, they are None and left out of run.json."""

    method: str
    ranking: str
    level: str
    target: float
    items: tuple[str, ...]
    reached: bool
    discovery: float | None
    discovery_ci: tuple[float | None, float | None]
    heldout: float | None
    heldout_ci: tuple[float | None, float | None]
    heldout_reached: bool
    sizes: CircuitSize
    candidates: int
    added: tuple[str, ...]
    n_discovery: int
    n_heldout: int
    split: str
    heads_only: bool
    notes: str
    seconds: float
    baseline: BaselineSummary | None = None
    validation: float | None = None
    validation_ci: tuple[float | None, float | None] | None = None
    n_validation: int | None = None

    def to_dict(self) -> dict[str, object]:
        """The JSON object; the validation fields only when the size was chosen on validation pairs."""
        out = super().to_dict()
        if self.n_validation is None:
            for key in ("validation", "validation_ci", "n_validation"):
                out.pop(key)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> CircuitSummary:
        plain = super().from_dict(data)
        sizes, baseline = data["sizes"], data.get("baseline")
        assert isinstance(sizes, Mapping) and (baseline is None or isinstance(baseline, Mapping))
        return dataclasses.replace(plain, sizes=CircuitSize(**sizes),
                                   baseline=BaselineSummary.from_dict(baseline) if baseline is not None else None)


@dataclass(frozen=True)
class EngineRecord(Summary):
    """Which engine ran the model: the `backend` used, the one `requested` (--backend) and why; `circuitlab run`
    adds the architecture description the engine read (`patching.architecture.Architecture.as_dict`)."""

    backend: str
    requested: str
    reason: str
    architecture: dict[str, object] | None = None

    def to_dict(self) -> dict[str, object]:
        """The JSON object; `architecture` only when recorded (`circuitlab localize` records none)."""
        out = super().to_dict()
        if self.architecture is None:
            out.pop("architecture")
        return out


@dataclass(frozen=True)
class ModelRecord(Summary):
    """The model a run measured (run.json `model`): its name, weight hash and shape, a label per prompt position
    (`reports.run`), the engine that ran it and how the held-out pairs were split (`reports.prompts.SPLITS`).
    The graph's topology is read from these fields, so saved scores keep the topology they were computed on."""

    name: str
    weight_hash: str
    n_layers: int
    n_heads: int
    n_key_value_heads: int
    d_model: int
    d_vocab: int
    attn_only: bool
    parallel_attn_mlp: bool
    architecture: str
    has_tokenizer: bool
    position_labels: tuple[str, ...]
    engine: EngineRecord | None = None  # None in runs saved before engines were recorded
    heldout_split: str | None = None  # None in runs saved before held-out splits

    def to_dict(self) -> dict[str, object]:
        """The JSON object (an older run's missing `engine`/`heldout_split` stay missing)."""
        out = super().to_dict()
        out["engine"] = None if self.engine is None else self.engine.to_dict()
        for key in ("engine", "heldout_split"):
            if out[key] is None:
                out.pop(key)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> ModelRecord:
        """The record of run.json's `model` object, including older runs' (fields added since get their old
        meaning: grouped heads default to `n_heads`, flags to False)."""
        old = {"n_key_value_heads": data.get("n_key_value_heads") or data["n_heads"], "attn_only": False,
               "parallel_attn_mlp": False, "architecture": "", "has_tokenizer": False, "position_labels": ()}
        plain = super().from_dict({**old, **{k: v for k, v in data.items() if v is not None}})
        engine = data.get("engine")
        assert engine is None or isinstance(engine, Mapping)
        return dataclasses.replace(plain, engine=EngineRecord.from_dict(engine) if engine else None)


# the RunResult fields that hold a summary, and their types (the stage cache and run.json read them back)
SUMMARY_TYPES: dict[str, type[Summary]] = {"faithful": CircuitSummary, "oracle_summary": OracleSummary,
                                          "faithfulness_summary": FaithfulnessSummary, "acdc_summary": AcdcSummary,
                                          "prompt_split": SplitSummary, "model": ModelRecord}

__all__ = ["AcdcSummary", "BaselineSummary", "CircuitSummary", "EngineRecord", "FaithfulnessSummary", "ModelRecord",
           "OracleSummary", "SUMMARY_TYPES", "SplitSummary", "Summary"]
