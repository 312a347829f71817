"""Atomic file writes and the stage cache that lets an interrupted run resume.

Every output file is written to a temporary sibling and renamed into place, so a reader (or a rerun) never
sees half a file. Stage results live in `.partial/<resume key>/<stage>.*` (in the staging folder while a run
works, inside the finished folder after); each stage's `.done` marker lists its files with size and SHA-256,
and a saved stage whose files no longer match is recomputed, never resumed from. The resume key covers the
resolved config, the model's weights, the task's prompt pairs and the code version (`resume_key`).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import pandas as pd
import torch

PARTIAL = ".partial"
_UMASK = os.umask(0)
os.umask(_UMASK)


def _atomic(path: Path, write: Callable[[Path], None]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write text atomically."""
    return _atomic(Path(path), lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write bytes atomically."""
    return _atomic(Path(path), lambda tmp: tmp.write_bytes(data))


def write_json(path: str | os.PathLike[str], data: Any) -> Path:
    """Write JSON atomically (NaN written as null)."""
    return write_text(path, json.dumps(_clean(data), indent=1, sort_keys=False) + "\n")


def _clean(value: Any) -> Any:
    if isinstance(value, float) and value != value:
        return None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        try:
            return _clean(value.item())
        except (ValueError, AttributeError):
            return str(value)
    return value


def write_csv(path: str | os.PathLike[str], frame: pd.DataFrame) -> Path:
    """Write a DataFrame as CSV atomically (floats round-trip exactly, no index)."""
    return _atomic(Path(path), lambda tmp: frame.to_csv(tmp, index=False))


def read_csv(path: str | os.PathLike[str]) -> pd.DataFrame:
    """Read a CSV written by `write_csv` (empty strings stay empty strings); errors name the file."""
    try:
        return pd.read_csv(path, keep_default_na=False, na_values=[""], low_memory=False).pipe(_fill_text)
    except (ValueError, UnicodeDecodeError, pd.errors.ParserError) as exc:  # EmptyDataError is a ValueError
        raise ValueError(f"{path} is not a readable CSV table ({' '.join(str(exc).split())}); delete it and rerun "
                         "the command that wrote it") from None


def read_json(path: str | os.PathLike[str]) -> Any:
    """Read a JSON file; errors name the file."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is not valid JSON ({exc}); delete it and rerun the command that wrote it") from None


def read_tensors(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Load a tensor file written by `StageCache.save_tensors`; errors name the file."""
    try:
        return torch.load(path, weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as exc:  # torch raises many types for a damaged file
        raise ValueError(f"{path} is not a readable tensor file ({type(exc).__name__}: "
                         f"{' '.join(str(exc).split())[:200]}); delete it and rerun") from None


TEXT_COLUMNS = ("component", "node", "role", "edge", "sender", "receiver", "channel", "method", "evidence",
                "selection", "direction", "source")


def _fill_text(frame: pd.DataFrame) -> pd.DataFrame:
    for col in frame.columns:
        if col in TEXT_COLUMNS or frame[col].dtype == object:
            frame[col] = frame[col].fillna("").astype(str)
    return frame


def file_record(path: Path) -> dict[str, Any]:
    """Size and SHA-256 of one file."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    return {"bytes": path.stat().st_size, "sha256": digest.hexdigest()}


def code_version() -> str:
    """A fingerprint of circuitlab's own source (every .py file of the package): any code change changes it."""
    root = Path(__file__).resolve().parent.parent
    digest = hashlib.sha256()
    for folder in ("", "patching", "tasks", "graphs", "reports"):
        for path in sorted((root / folder).glob("*.py")):
            digest.update(f"{folder}/{path.name}".encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def resume_key(parts: dict[str, str]) -> str:
    """The resume key: a hash of its parts (config key, model weight hash, task data hash, code version)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


KEY_FILE = "key.json"


def describe_stale(partial: Path, parts: dict[str, str]) -> list[str]:
    """Why saved partial work under `partial/` cannot be reused by a run whose key has these parts."""
    names = {"config": "the run options", "model": "the model's weights", "task": "the task's prompt pairs",
             "code": "circuitlab's code"}
    reasons = []
    if not partial.is_dir():
        return reasons
    for folder in sorted(partial.iterdir()):
        if folder.name == resume_key(parts) or not folder.is_dir():
            continue
        try:
            old = json.loads((folder / KEY_FILE).read_text())
        except (OSError, ValueError):
            old = {}
        changed = [names[k] for k in names if old.get(k) != parts.get(k)] if old else ["(unrecorded key)"]
        reasons.append(f"saved work in {folder} differs in {', '.join(changed)}")
    return reasons


class StageCache:
    """Saved stage results of one run under `<folder>/.partial/<key>/`; each stage's files are verified."""

    def __init__(self, folder: str | os.PathLike[str], key: str) -> None:
        self.root = Path(folder) / PARTIAL / key
        self._written: list[Path] = []
        self.problems: dict[str, str] = {}

    def path(self, stage: str, suffix: str) -> Path:
        return self.root / f"{stage}{suffix}"

    def has(self, stage: str) -> bool:
        """True when the stage finished and every file it saved still matches its size and SHA-256."""
        done = self.path(stage, ".done")
        if not done.is_file():
            return False
        try:
            files = json.loads(done.read_text())["files"]
        except (OSError, ValueError, KeyError, TypeError):
            self.problems[stage] = f"{done} is unreadable or has no file list"
            done.unlink(missing_ok=True)
            return False
        for name, expected in files.items():
            path = self.root / name
            problem = None
            if not path.is_file():
                problem = f"{path} is missing"
            elif path.stat().st_size != expected.get("bytes"):
                problem = f"{path} has {path.stat().st_size} bytes, its record says {expected.get('bytes')}"
            elif file_record(path)["sha256"] != expected.get("sha256"):
                problem = f"{path} does not match its recorded SHA-256"
            if problem:
                self.problems[stage] = problem
                done.unlink(missing_ok=True)
                return False
        return True

    def mark(self, stage: str, seconds: float) -> None:
        """Record the stage as done, with size and SHA-256 of every file it saved."""
        files = {p.name: file_record(p) for p in dict.fromkeys(self._written)}
        self._written = []
        write_json(self.path(stage, ".done"), {"seconds": seconds, "files": files})

    def seconds(self, stage: str) -> float:
        try:
            return float(json.loads(self.path(stage, ".done").read_text())["seconds"])
        except (OSError, ValueError, KeyError):
            return float("nan")

    def _wrote(self, path: Path) -> None:
        self._written.append(path)

    def save_tensors(self, stage: str, tensors: dict[str, torch.Tensor]) -> None:
        self._wrote(_atomic(self.path(stage, ".pt"), lambda tmp: torch.save(tensors, tmp)))

    def load_tensors(self, stage: str) -> dict[str, torch.Tensor]:
        return read_tensors(self.path(stage, ".pt"))

    def save_frame(self, stage: str, frame: pd.DataFrame, name: str = "") -> None:
        self._wrote(write_csv(self.path(stage + name, ".csv"), frame))

    def load_frame(self, stage: str, name: str = "") -> pd.DataFrame:
        return read_csv(self.path(stage + name, ".csv"))

    def save_json(self, stage: str, data: Any) -> None:
        self._wrote(write_json(self.path(stage, ".json"), data))

    def load_json(self, stage: str) -> Any:
        return read_json(self.path(stage, ".json"))

    def save_file(self, stage: str, suffix: str, write: Callable[[Path], None]) -> Path:
        """Save a stage file written by `write(tmp_path)` (atomically)."""
        path = _atomic(self.path(stage, suffix), write)
        self._wrote(path)
        return path
