"""One cell of a sweep: what it is, its content address, and running it into a folder of files.

A cell is a plain description (`Cell`: kind, parameters, resources) that pickles to any worker. Running it
(`run_cell`) happens in a private staging folder and returns every file it wrote as bytes together with its
status, so the driver writes the cell's folder itself (workers need no shared filesystem) and a cell folder
is either complete or absent; `run_cell` lives with the kinds it dispatches to, in `reports.cell_kinds`. Kinds: `run` (one ordinary `circuitlab run`) and `bench` (one discovery method
on a model with a known circuit, as in `circuitlab bench methods`).

A cell's key hashes its resolved parameters, the code version (every source file of the package) and the
model's weight files, so a rerun can tell a finished cell from one whose inputs changed.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from circuitlab.graphs.groundtruth import MODELS_DIR, list_groundtruth
from circuitlab.patching.models import _smollm2_gguf
from circuitlab.reports.store import code_version

KINDS = ("run", "bench")
STATUSES = ("done", "failed", "skipped")


class SkipCell(Exception):
    """Raised inside a cell that cannot run by design (e.g. ACDC above its edge limit); the message is the reason."""


@dataclass(frozen=True)
class Cell:
    """One grid point: `kind`, its parameters (plain JSON values) and the resources it asks of an executor."""

    kind: str
    params: dict[str, object]
    resources: dict[str, object] = field(default_factory=dict)

    def resolved(self) -> dict[str, object]:
        """Everything that changes the cell's results (resources other than CPU threads do not)."""
        return {"kind": self.kind, "params": self.params, "threads": self.threads}

    @property
    def threads(self) -> int:
        """Torch threads inside the cell: its `num_cpus` (default 1), the same on every executor."""
        return max(1, int(self.resources.get("num_cpus", 1) or 1))

    def label(self) -> str:
        """A readable folder-name prefix from the parameters that usually vary in a grid."""
        parts = []
        for key in ("model", "task", "method", "counterfactual", "seed"):
            if key in self.params and self.params[key] is not None:
                value = str(self.params[key])
                value = Path(value).name if ("/" in value or os.sep in value) else value
                parts.append(f"{key[0]}{value}" if key == "seed" else value)
        text = "-".join(parts) or self.kind
        return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)[:80]


@dataclass
class CellOutcome:
    """What running a cell produced: status, the error or skip reason, result values, files, measurements."""

    status: str
    error: str = ""
    reason: str = ""
    result: dict[str, object] = field(default_factory=dict)
    files: dict[str, bytes] = field(default_factory=dict)
    wall_seconds: float = 0.0
    peak_rss_mb: float = float("nan")
    backend: dict[str, object] = field(default_factory=dict)


# ---------------------------------------------------------------------- content address

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf", ".npz", ".json")


@lru_cache(maxsize=64)
def _files_hash(folder: str, stamp: tuple[tuple[str, int, int], ...]) -> str:
    digest = hashlib.sha256()
    for rel, _, _ in stamp:
        digest.update(rel.encode())
        with open(Path(folder) / rel, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 22), b""):
                digest.update(chunk)
    return digest.hexdigest()[:16]


def _folder_hash(folder: Path) -> str:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in _WEIGHT_SUFFIXES)
    stamp = tuple((str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns) for p in files)
    if not stamp:
        raise FileNotFoundError(f"model directory {folder} holds no weight or config files")
    return _files_hash(str(folder), stamp)


def model_fingerprint(model: str) -> str:
    """A hash of a model's weight files, computed without loading it (`unhashed:<name>` for hub names)."""
    path = Path(model).expanduser()
    if path.is_dir():
        return _folder_hash(path)
    if model in list_groundtruth():
        return _folder_hash(MODELS_DIR / model)
    if model.lower() in ("smollm2-135m", "smollm2", "smollm2-135m-instruct", "smollm2-ioi"):
        gguf = _smollm2_gguf()
        return _files_hash(str(gguf.parent), ((gguf.name, gguf.stat().st_size, gguf.stat().st_mtime_ns),))
    return f"unhashed:{model}"


def cell_key(cell: Cell) -> str:
    """The cell's content address: resolved parameters + code version + model weight hash + the content of
    input files named by parameters (16 hex)."""
    model = str(cell.params.get("model", ""))
    try:
        weights = model_fingerprint(model) if model else ""
    except (OSError, ValueError) as exc:  # the cell will fail when it runs; its key still must be stable
        weights = f"unreadable:{type(exc).__name__}"
    files = {}  # input files named by a parameter (a task dataset, a circuit, a task spec): their content counts
    for name, value in sorted(cell.params.items()):
        if name != "model" and isinstance(value, str) and value and Path(value).expanduser().is_file():
            path = Path(value).expanduser()
            files[name] = _files_hash(str(path.parent), ((path.name, path.stat().st_size, path.stat().st_mtime_ns),))
    data = {**cell.resolved(), "code": code_version(), "weights": weights, "files": files}
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]
