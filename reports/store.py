"""Atomic file writes and the stage cache that lets an interrupted run resume.

Every output file is written to a temporary sibling and renamed into place, so a reader (or a rerun) never
sees half a file. Stage results live in `OUT/.partial/<config key>/<stage>.*`; a rerun with the same
result-changing options finds them and skips the stage.
"""

from __future__ import annotations

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
    """Read a CSV written by `write_csv` (empty strings stay empty strings)."""
    return pd.read_csv(path, keep_default_na=False, na_values=[""], low_memory=False).pipe(_fill_text)


TEXT_COLUMNS = ("component", "node", "role", "edge", "sender", "receiver", "channel", "method", "evidence",
                "selection", "direction", "source")


def _fill_text(frame: pd.DataFrame) -> pd.DataFrame:
    for col in frame.columns:
        if col in TEXT_COLUMNS or frame[col].dtype == object:
            frame[col] = frame[col].fillna("").astype(str)
    return frame


def check_writable(directory: str | os.PathLike[str]) -> Path:
    """Create the output directory and prove it is writable; raise a clear error otherwise."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        from circuitlab.reports.config import ConfigError

        raise ConfigError(f"cannot write to output directory {str(directory)!r} ({exc.strerror or exc}); "
                              "choose another --out") from None
    return directory


class StageCache:
    """Saved stage results of one run configuration under `OUT/.partial/<key>/`."""

    def __init__(self, out: str | os.PathLike[str], key: str) -> None:
        self.root = Path(out) / PARTIAL / key

    def path(self, stage: str, suffix: str) -> Path:
        return self.root / f"{stage}{suffix}"

    def has(self, stage: str) -> bool:
        return self.path(stage, ".done").is_file()

    def mark(self, stage: str, seconds: float) -> None:
        write_json(self.path(stage, ".done"), {"seconds": seconds})

    def seconds(self, stage: str) -> float:
        try:
            return float(json.loads(self.path(stage, ".done").read_text())["seconds"])
        except (OSError, ValueError, KeyError):
            return float("nan")

    def save_tensors(self, stage: str, tensors: dict[str, torch.Tensor]) -> None:
        _atomic(self.path(stage, ".pt"), lambda tmp: torch.save(tensors, tmp))

    def load_tensors(self, stage: str) -> dict[str, torch.Tensor]:
        return torch.load(self.path(stage, ".pt"), weights_only=True)

    def save_frame(self, stage: str, frame: pd.DataFrame, name: str = "") -> None:
        write_csv(self.path(stage + name, ".csv"), frame)

    def load_frame(self, stage: str, name: str = "") -> pd.DataFrame:
        return read_csv(self.path(stage + name, ".csv"))

    def save_json(self, stage: str, data: Any) -> None:
        write_json(self.path(stage, ".json"), data)

    def load_json(self, stage: str) -> Any:
        return json.loads(self.path(stage, ".json").read_text())
