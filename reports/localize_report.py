"""The `circuitlab localize` report as sections of the standard report (`reports.page`): report.html (Plotly
heatmaps, sortable tables, nothing fetched) and report.md with figures/*.png, like a `circuitlab run` folder.

One overview section (the pairs, the split, the controls and the best site per featurizer), then one section per
featurizer: its held-out IIA heatmap over layers × sites, with the controls beside it (at each of its best sites:
the full-vector ceiling there, the random rotation with the same k there, and the no-intervention baseline).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Mapping

import pandas as pd

from circuitlab.patching.localize import LocalizeConfig, LocalizeResult
from circuitlab.reports import figures, plots, store
from circuitlab.reports.page import Section, to_html, to_markdown
from circuitlab.reports.summaries import EngineRecord

CONTROL_ROWS = 8  # best sites listed beside each featurizer's heatmap


@dataclass(frozen=True)
class LocalizeRecord:
    """What `circuitlab localize` ran (its run.json, less the outputs and wall time added when the folder is
    written): the task (a name or a counterfactual file), the variable, the sweep's `LocalizeConfig`, the engine,
    the model, and how many pairs were train and test. `to_dict` is run.json's form, `from_dict` reads it back."""

    task: str
    variable: str
    config: LocalizeConfig
    seed: int
    engine: EngineRecord
    model_name: str
    weight_hash: str
    n_train: int
    n_test: int

    def to_dict(self) -> dict[str, object]:
        return {"command": "circuitlab localize", "kind": "localize", "task": self.task, "variable": self.variable,
                "config": asdict(self.config), "seed": self.seed, "engine": self.engine.to_dict(),
                "model": {"name": self.model_name, "weight_hash": self.weight_hash},
                "split": {"train": self.n_train, "test": self.n_test}}

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> LocalizeRecord:
        """The record of a localize folder's run.json (keys it does not know, e.g. `outputs`, are ignored)."""
        config, engine, model, split = data["config"], data["engine"], data["model"], data["split"]
        assert all(isinstance(v, Mapping) for v in (config, engine, model, split)), \
            "run.json's config, engine, model and split must be JSON objects: rerun `circuitlab localize`"
        return cls(task=str(data["task"]), variable=str(data["variable"]),
                   config=LocalizeConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in config.items()}),
                   seed=int(data["seed"]), engine=EngineRecord.from_dict(engine), model_name=str(model["name"]),
                   weight_hash=str(model["weight_hash"]), n_train=int(split["train"]), n_test=int(split["test"]))


def _site(frame: pd.DataFrame) -> pd.Series:
    return frame.component + frame["head"].map(lambda h: "" if h < 0 else f".h{h}") + "@" + frame.position.astype(str)


def grid(frame: pd.DataFrame, featurizer: str) -> pd.DataFrame:
    """Held-out IIA of one featurizer, layers × sites (the best k where several were measured)."""
    part = frame[(frame.featurizer == featurizer) & (frame.split == "test")]
    if part.empty:
        return part
    return part.assign(site=_site(part)).pivot_table(index="layer", columns="site", values="iia", aggfunc="max")


def _controls(frame: pd.DataFrame, featurizer: str, none: float) -> pd.DataFrame:
    """The featurizer's best held-out sites with the controls measured at the same site (and k)."""
    test = frame[frame.split == "test"].assign(site=lambda f: _site(f))
    part = test[test.featurizer == featurizer].sort_values(["iia", "graded"], ascending=False).head(CONTROL_ROWS)
    full = test[test.featurizer == "full"].set_index(["site", "layer"])["iia"]
    random = test[test.featurizer == "random"].set_index(["site", "layer", "dims"])["iia"]
    rows = []
    for r in part.itertuples(index=False):
        rows.append({"layer": r.layer, "site": r.site, "k": r.dims, "test IIA": r.iia, "95% CI low": r.iia_low,
                     "95% CI high": r.iia_high, "graded": r.graded, "full vector (ceiling)": full.get((r.site, r.layer)),
                     "random rotation, same k": random.get((r.site, r.layer, r.dims)), "no intervention": none,
                     "n": r.n})
    return pd.DataFrame(rows)


def sections(result: LocalizeResult) -> list[Section]:
    """The overview section and one section per featurizer (heatmap + controls)."""
    frame, cf = result.to_frame(), result.counterfactuals
    none_rows = frame[(frame.featurizer == "none") & (frame.split == "test")]
    none = float(none_rows.iia.iloc[0]) if len(none_rows) else float("nan")
    overview = Section(f"Where is `{result.variable}` represented? ({result.task})", paragraphs=[
        f"{len(cf)} counterfactual pairs: {cf.split.count('train')} train (featurizers fitted or trained there), "
        f"{cf.split.count('test')} held out (every number below). IIA: the intervened top token is the causal "
        "model's answer; 95 % bootstrap intervals over pairs; graded = mean(LD_int − LD_none) / (2·mean|LD_none|).",
        f"Controls: no intervention (the base run already says the expected token) {none:.2f}; `full` (the whole "
        "vector at the site, the ceiling); `random` (a random rotation with the same k at the same site)."])
    best = []
    for feat in [f for f in frame.featurizer.unique() if f != "none"]:
        part = frame[(frame.featurizer == feat) & (frame.split == "test")].sort_values(["iia", "graded"])
        r = part.iloc[-1]
        best.append({"featurizer": feat, "best site": f"{r.component} L{r.layer} {r.position}"
                     + ("" if r["head"] < 0 else f" h{r['head']}"), "k": r.dims, "test IIA": r.iia,
                     "95% CI low": r.iia_low, "95% CI high": r.iia_high, "graded": r.graded})
    overview.tables.append(("Best held-out site per featurizer", pd.DataFrame(best)))
    out = [overview]
    for feat in [f for f in frame.featurizer.unique() if f not in ("none", "random")]:
        heat = grid(frame, feat)
        if heat.empty:
            continue
        stem, title = f"iia_{feat}", f"{feat}: held-out IIA of {result.variable}, layer × site"
        section = Section(f"{feat}: test IIA by layer × site", plots={stem: plots.iia_heatmap(heat, title)})
        section.figures.append((stem, title, figures.png_bytes(figures.iia_heatmap(heat, title))))
        section.tables.append((f"Controls beside {feat}'s best sites", _controls(frame, feat, none)))
        out.append(section)
    return out


def write_report(result: LocalizeResult, record: LocalizeRecord, folder: Path) -> None:
    """report.html, report.md and figures/*.png into `folder` (a staging folder of the run-folder module)."""
    parts = sections(result)
    for section in parts:
        for stem, _, png in section.figures:
            store.write_bytes(folder / "figures" / f"{stem}.png", png)
    store.write_text(folder / "report.html", to_html(record.to_dict(), parts))
    store.write_text(folder / "report.md", to_markdown(record.to_dict(), parts))


__all__ = ["LocalizeRecord", "grid", "sections", "write_report"]
