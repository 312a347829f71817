"""Run configurations: the `RunConfig` dataclass, loading it from YAML/JSON files, validating it, hashing it.

Precedence: dataclass defaults < config file < command-line flags that were given. A config file holds
`RunConfig` fields at its top level; an optional `runs:` list turns it into a sweep, each entry's fields
overriding the top level (each entry needs its own `out`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from circuitlab.graphs.variables import head_selection, variable_names
from circuitlab.patching.methods import alias_names, get_method, method_names, run_method_names, search_names
from circuitlab.reports.checks import (  # re-exported: the run's modules import them from here
    ConfigError, check_backend, check_device, check_memory_budget, check_seed, parse_percents, parse_positions,
)
from circuitlab.reports.parsing import DuplicateKeyError, parse_unique
from circuitlab.tasks import get_task
from circuitlab.tasks.custom import load_task, looks_like_path


@dataclass
class RunConfig:
    """Everything that determines a `circuitlab run` (and so its results and its resume cache key).

    Circuit selection: at most one of `top_fraction`, `threshold`, `top_k`; none given = the top 50 edges
    (edge methods) or top 20 components (node methods), widened until the circuit connects input to logits.
    `positions`: where heads and MLPs are patched exactly — `all`, `each`, task roles (`END` or
    `S2,END`), or `none` (no exact patching: the slowest stage, one patched forward per head and MLP). `resid_positions`: the residual-stream heatmap (`each` position, the task's `roles`, or `none`),
    over at most `resid_layers` evenly spaced layers. `percents`: the faithfulness curve's k (% of edges).
    `threads`: CPU threads for torch (default: the cores free when the run starts, `resolve_threads`; run.json
    records the number used and why).

    The circuit (unless a size is forced with the options above) is the smallest circuit whose exact faithfulness
    on the discovery pairs reaches `faithfulness_target`, found by `circuit_method` and reported on `heldout_n`
    held-out pairs (default `n`) from templates the discovery pairs do not use (`reports.faithful`). `auto`:
    the method's own ranking (its registry entry's `circuit`, `patching.methods`); `greedy` refines it by exact gains.
    `variables`: task variables (comma-separated) whose IIA is measured at circuit heads (`graphs.variables`):
    `variables_heads` (all, or roles and head names; `graphs.variables.head_selection`).
    `validation_n`: with it, the prompts are split three ways by template (`tasks.split.validation_split`) and
    the circuit's size is chosen within the target band on the discovery and these validation pairs
    (`graphs.selection.select_validated`), so the held-out pairs stay unseen by discovery and by selection.
    `mask_steps`: mask-learning length of node-/edge-pruning; `stability_resamples` > 0 reruns the circuit
    method on that many bootstrap resamples and reports how often each component is included.
    """

    task: str = "ioi"
    model: str = "smollm2-135m"
    method: str = "eap-ig"
    out: str = "runs/ioi"
    n: int = 16
    seed: int = 0
    corruption: str | None = None
    top_fraction: float | None = None
    threshold: float | None = None
    top_k: int | None = None
    positions: str = "all"
    resid_positions: str = "each"
    resid_layers: int = 10
    memory_budget: float = 2048.0
    batch_size: int | None = None
    device: str = "cpu"
    threads: int | None = None
    steps: int = 5
    oracle_edges: int = 200
    acdc_threshold: float = 0.05
    n_boot: int = 1000
    percents: str = "0.1,0.2,0.5,1,2,5,10,20,50,100"
    roles: bool = True
    force: bool = False
    task_options: dict[str, object] = field(default_factory=dict)
    faithfulness_target: float = 0.8
    circuit_method: str = "auto"
    heldout_n: int | None = None
    mask_steps: int = 60
    stability_resamples: int = 0
    backend: str = "auto"
    variables: str = ""
    variables_heads: str = "all"
    edge_positions: str = "none"  # roles: edges split by role segment (`patching.topology.PositionalGraph`)
    validation_n: int | None = None  # None: sizes chosen on the discovery pairs (run.json and resume key unchanged)

    # fields that do not change results (left out of the resume key)
    _NON_RESULT = ("out", "force", "batch_size", "backend")  # any batch size or backend gives the same numbers
    # fields added after runs were saved: left out of run.json and the resume key while unset, so older runs resume
    _UNSET_OMITTED = ("validation_n",)

    def result_key(self) -> str:
        """A short hash of every field that changes results: equal keys mean a run may resume."""
        data = {k: v for k, v in self.to_dict().items() if k not in self._NON_RESULT}
        return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def to_dict(self) -> dict[str, object]:
        data = dataclasses.asdict(self)
        return {k: v for k, v in data.items() if not (k in self._UNSET_OMITTED and v is None)}

    def command(self) -> str:
        """The `circuitlab run` command line that reproduces this run."""
        parts = ["circuitlab", "run"]
        defaults = RunConfig()
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            flag = "--" + f.name.replace("_", "-")
            if f.name in ("task", "model", "method", "out", "n", "seed"):
                parts += [flag, _quote(str(value))]
            elif f.name == "task_options":
                for key, val in sorted(value.items()):
                    parts += ["--task-option", _quote(f"{key}={json.dumps(val)}")]
            elif isinstance(value, bool):
                if value != getattr(defaults, f.name):
                    parts.append(flag if value else "--no-" + f.name.replace("_", "-"))
            elif value is not None and value != getattr(defaults, f.name):
                parts += [flag, _quote(str(value))]
        return " ".join(parts)


def _quote(text: str) -> str:
    return shlex.quote(text)


FIELDS = {f.name for f in dataclasses.fields(RunConfig)}


def load_config_file(path: str | os.PathLike[str]) -> dict[str, object]:
    """Read a YAML or JSON experiment file into a dict (keys with `-` become `_`)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    text = path.read_text()
    try:
        data = parse_unique(text, json_file=path.suffix.lower() == ".json")
    except DuplicateKeyError as exc:
        raise ConfigError(f"config file {str(path)!r}: {exc}; keep one") from None
    except Exception as exc:  # yaml and json raise different types; both mean a malformed file
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"config file {str(path)!r} cannot be parsed: {first}") from exc
    if data is None or data == {}:
        raise ConfigError(f"config file {str(path)!r} is empty; write the run's options in it (e.g. `task: ioi`), "
                          "or drop --config to run with the defaults")
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping of run options, got {type(data).__name__}")
    return _normalise_keys(data, str(path))


def _normalise_keys(data: dict[str, Any], where: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name == "runs":
            if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
                raise ConfigError(f"{where}: 'runs' must be a list of mappings")
            out["runs"] = [_normalise_keys(v, f"{where} runs[{i}]") for i, v in enumerate(value)]
            continue
        if name not in FIELDS:
            raise ConfigError(f"{where}: unknown option {key!r}; known options: {', '.join(sorted(FIELDS))}")
        out[name] = value
    return out


def build_configs(file_values: dict[str, object], cli_values: dict[str, object]) -> list[RunConfig]:
    """Merge defaults, a config file (possibly a sweep) and given CLI values into validated configs."""
    runs = file_values.get("runs")
    base = {k: v for k, v in file_values.items() if k != "runs"}
    entries = [dict(base, **entry) for entry in runs] if runs else [base]
    configs = []
    for i, entry in enumerate(entries):
        merged = dict(entry)
        merged.update({k: v for k, v in cli_values.items() if v is not None})
        try:
            if merged.get("n") is None and _dataset_rows(merged.get("task")) is not None:
                merged["n"] = _dataset_rows(merged.get("task"))  # a dataset file: every row unless --n says fewer
            configs.append(make_config(merged))
        except ConfigError as exc:
            if not runs:
                raise
            where = f"runs[{i}]" + (f" (out {entry['out']})" if "out" in entry else "")
            raise ConfigError(f"{where}: {exc}") from None
    outs = [c.out for c in configs]
    if len(set(outs)) != len(outs):
        raise ConfigError("a sweep's runs need distinct 'out' directories (each run writes its own)")
    return configs


def _dataset_rows(task: Any) -> int | None:
    """How many rows a `--task` dataset file holds (None for built-in task names)."""
    if not isinstance(task, str) or not looks_like_path(task):
        return None
    try:
        return len(load_task(task).records)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def make_config(values: dict[str, object]) -> RunConfig:
    """A validated `RunConfig` from plain values (types are checked and coerced)."""
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(RunConfig):
        if f.name not in values:
            continue
        value = values[f.name]
        kwargs[f.name] = _coerce(f.name, value)
    if kwargs.get("method") in alias_names():  # `--method greedy`: EAP-IG diagnostics, the circuit by greedy
        kwargs["circuit_method"], kwargs["method"] = kwargs["method"], "eap-ig"
    cfg = RunConfig(**kwargs)
    validate(cfg)
    return cfg


_INTS = ("n", "batch_size", "seed", "steps", "oracle_edges", "n_boot", "top_k", "resid_layers", "threads",
         "heldout_n", "mask_steps", "stability_resamples", "validation_n")
_FLOATS = ("top_fraction", "threshold", "memory_budget", "acdc_threshold", "faithfulness_target")
_BOOLS = ("roles", "force")
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def _coerce(name: str, value: Any) -> Any:
    if value is None:
        return None
    try:
        if name in _INTS:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if name in _FLOATS:
            return float(value)
        if name in _BOOLS:
            text = str(value).strip().lower()
            if isinstance(value, bool) or text in _TRUE + _FALSE:
                return value if isinstance(value, bool) else text in _TRUE
            raise ConfigError(f"option {name!r} must be true or false, got {value!r}")
        if name == "task_options":
            if not isinstance(value, dict):
                raise ValueError
            return dict(value)
        if name == "positions" and isinstance(value, (list, tuple)):
            return ",".join(str(v) for v in value)
        return str(value)
    except ConfigError:
        raise
    except (TypeError, ValueError):
        raise ConfigError(f"option {name!r} has a bad value {value!r}") from None


def validate(cfg: RunConfig) -> None:
    """Check a config without loading anything heavy; raise `ConfigError` naming the bad option."""
    if cfg.method not in method_names():
        raise ConfigError(f"unknown method {cfg.method!r}: use one of {', '.join(run_method_names())}")
    try:
        task = get_task(cfg.task)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if cfg.n < 1:
        raise ConfigError(f"--n must be a positive number of prompt pairs, got {cfg.n}")
    check_seed(cfg.seed)
    check_device(cfg.device)
    if cfg.threshold is not None and not cfg.threshold >= 0:
        raise ConfigError(f"--threshold keeps edges/nodes with |score| >= it, so it must be >= 0, got {cfg.threshold}")
    if cfg.acdc_threshold < 0:
        raise ConfigError(f"--acdc-threshold must be >= 0, got {cfg.acdc_threshold}")
    if cfg.steps < 1:
        raise ConfigError(f"--steps must be >= 1, got {cfg.steps}")
    if cfg.oracle_edges < 0 or cfg.n_boot < 0:
        raise ConfigError("--oracle-edges and --n-boot must be >= 0")
    if cfg.n_boot > MAX_N_BOOT:
        raise ConfigError(f"--n-boot {cfg.n_boot} is more bootstrap resamples than any interval needs (at most "
                          f"{MAX_N_BOOT}; 1000, the default, gives a 95% interval to about ±0.01)")
    if cfg.threads is not None and cfg.threads < 1:
        raise ConfigError(f"--threads must be >= 1, got {cfg.threads}")
    if cfg.batch_size is not None and cfg.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1 prompt pairs, got {cfg.batch_size}")
    check_memory_budget(cfg.memory_budget)
    check_backend(cfg.backend)
    given = [x for x in ("top_fraction", "threshold", "top_k") if getattr(cfg, x) is not None]
    if len(given) > 1:
        raise ConfigError(f"give at most one of --top-fraction, --threshold, --top-k (got {', '.join(given)})")
    if cfg.top_fraction is not None and not 0 < cfg.top_fraction <= 1:
        raise ConfigError(f"--top-fraction must be in (0, 1], got {cfg.top_fraction}")
    if cfg.top_k is not None and cfg.top_k < 1:
        raise ConfigError(f"--top-k must be >= 1, got {cfg.top_k}")
    if cfg.positions != "none":
        parse_positions(cfg.positions, task.roles)
    if cfg.resid_positions not in ("each", "roles", "none"):
        raise ConfigError(f"--resid-positions must be each, roles or none, got {cfg.resid_positions!r}")
    if cfg.edge_positions not in ("none", "roles") or (cfg.edge_positions != "none" and get_method(cfg.method).level != "edge"):
        raise ConfigError(f"--edge-positions must be none or roles (an edge method), got {cfg.edge_positions!r} with --method {cfg.method}")
    if cfg.resid_layers < 1:
        raise ConfigError(f"--resid-layers must be >= 1, got {cfg.resid_layers}")
    parse_percents(cfg.percents)

    if cfg.circuit_method not in ("auto",) + search_names():
        raise ConfigError(f"unknown --circuit-method {cfg.circuit_method!r}: use auto or one of "
                          f"{', '.join(search_names())}")
    if not 0.0 < cfg.faithfulness_target <= 1.0:
        raise ConfigError(f"--faithfulness-target must be in (0, 1], got {cfg.faithfulness_target}")
    if cfg.heldout_n is not None and cfg.heldout_n < 2:
        raise ConfigError(f"--heldout-n must be >= 2 (a bootstrap interval needs two pairs), got {cfg.heldout_n}")
    if cfg.validation_n is not None and cfg.validation_n < 2:
        raise ConfigError(f"--validation-n must be >= 2 (a bootstrap interval needs two pairs), got {cfg.validation_n}; "
                          "or leave it out to choose the circuit's size on the discovery pairs")
    if cfg.mask_steps < 1:
        raise ConfigError(f"--mask-steps must be >= 1, got {cfg.mask_steps}")
    if cfg.stability_resamples < 0:
        raise ConfigError(f"--stability-resamples must be >= 0, got {cfg.stability_resamples}")
    if cfg.corruption is not None and task.name != "ioi":
        raise ConfigError(f"--corruption applies to the ioi task only (task {task.name!r} has one corruption)")
    if cfg.corruption is not None and cfg.corruption not in ("abc", "s2_io_flip"):
        raise ConfigError(f"unknown IOI corruption {cfg.corruption!r}: use abc or s2_io_flip")
    for flag, check in (("--variables", lambda: cfg.variables and variable_names(cfg.variables, task.name)),
                        ("--variables-heads", lambda: head_selection(cfg.variables_heads))):
        try:
            check()
        except ValueError as exc:
            raise ConfigError(f"{flag}: {exc}") from None


MAX_N_BOOT = 100_000


def check_heldout_n(cfg: RunConfig) -> None:
    """`--heldout-n >= 2` where it defaults to --n (checked after a dataset's rows, so a bad row is named first)."""
    if cfg.heldout_n is None and cfg.n < 2:
        raise ConfigError(f"held-out faithfulness needs >= 2 held-out pairs (a bootstrap interval needs two), and "
                          f"--heldout-n defaults to --n, which is {cfg.n} here (a file of {cfg.n} row gives "
                          f"{cfg.n} pair); give --heldout-n 2 or more, or more pairs / rows")


