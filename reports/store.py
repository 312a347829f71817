"""Atomic file writes: every output file is written to a temporary sibling and renamed into place, so a
reader (or a rerun) never sees half a file. Stage results of unfinished runs live under `OUT/.partial/`
(`reports.save.StageCache`).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import pandas as pd

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


def write_with(path: str | os.PathLike[str], write: Callable[[Path], Any]) -> Path:
    """Write a file atomically with `write(tmp_path)` (any writer that takes a path)."""
    return _atomic(Path(path), lambda tmp: write(tmp))


def write_parquet(path: str | os.PathLike[str], frame: pd.DataFrame) -> Path:
    """Write a DataFrame as Parquet atomically (dtypes round-trip: bools stay bools)."""
    return _atomic(Path(path), lambda tmp: frame.to_parquet(tmp, index=False))


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
