"""Atomic file writes: every output file is written to a temporary sibling and renamed into place, so a
reader (or a rerun) never sees half a file. Also the resume key (config, model weights, prompt pairs, code
version) and file records (size and SHA-256) that let a run folder and its saved stages be verified.
Stage results live under `.partial/<resume key>/` (`reports.save.StageCache`).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from circuitlab.graphs.circuit import json_safe
from circuitlab.reports.config import ConfigError

PARTIAL = ".partial"
_UMASK = os.umask(0)
os.umask(_UMASK)


class DiskFullError(OSError):
    """The disk filled up (ENOSPC / EDQUOT) while writing an output file: one line naming the file, the free
    space left and what to do, instead of a bare `[Errno 28]`."""


def disk_full(exc: BaseException) -> bool:
    """Whether an error means "no space left" (an OSError's errno, or a writer such as pyarrow that keeps only
    the text)."""
    if not isinstance(exc, OSError):
        return False
    return exc.errno in (errno.ENOSPC, errno.EDQUOT) or "No space left on device" in str(exc)


def _disk_full_error(path: Path, exc: OSError) -> DiskFullError:
    try:
        free = f"{shutil.disk_usage(path.parent).free / 2**20:.0f} MiB free"
    except OSError:
        free = "free space unknown"
    error = DiskFullError(f"the disk is full: no space left on the device holding {path.parent} ({free}) while "
                          f"writing {path.name}; free some space there or choose an --out on another disk")
    error.errno = errno.ENOSPC
    return error


def _atomic(path: Path, write: Callable[[Path], None]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except OSError as exc:
        if disk_full(exc) and not isinstance(exc, DiskFullError):
            raise _disk_full_error(path, exc) from exc
        raise
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def write_with(path: str | os.PathLike[str], write: Callable[[Path], object]) -> Path:
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


def write_json(path: str | os.PathLike[str], data: object) -> Path:
    """Write strict JSON atomically (NaN and infinities written as null)."""
    return write_text(path, json.dumps(json_safe(data), indent=1, sort_keys=False, allow_nan=False) + "\n")


def plain_row(row: dict[str, object]) -> dict[str, object]:
    """A result row ready for a cell's result.csv/JSON: NumPy scalars as Python numbers, NaN as None (missing)."""
    plain = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in row.items()}
    return {k: (None if isinstance(v, float) and v != v else v) for k, v in plain.items()}


def write_csv(path: str | os.PathLike[str], frame: pd.DataFrame) -> Path:
    """Write a DataFrame as CSV atomically (floats round-trip exactly, no index)."""
    return _atomic(Path(path), lambda tmp: frame.to_csv(tmp, index=False))


def read_csv(path: str | os.PathLike[str]) -> pd.DataFrame:
    """Read a CSV written by `write_csv` (empty strings stay empty strings); errors name the file."""
    try:
        frame = pd.read_csv(path, keep_default_na=False, na_values=[""], low_memory=False)
    except (ValueError, UnicodeDecodeError) as exc:  # pandas' parser and empty-data errors are ValueErrors
        raise ValueError(f"{path} is not a readable CSV table ({' '.join(str(exc).split())}); delete it and rerun "
                         "the command that wrote it") from None
    for col in frame.columns:
        if frame[col].dtype == object:
            frame[col] = frame[col].fillna("").astype(str)
    return frame


def read_parquet(path: str | os.PathLike[str]) -> pd.DataFrame:
    """Read a Parquet table; errors name the file."""
    try:
        return pd.read_parquet(path)
    except FileNotFoundError:
        raise
    except Exception as exc:  # pyarrow raises its own types for a damaged file
        raise ValueError(f"{path} is not a readable Parquet table ({type(exc).__name__}: "
                         f"{' '.join(str(exc).split())[:200]}); delete it and rerun the command that wrote it") from None


def read_json(path: str | os.PathLike[str]) -> object:
    """Read a JSON file; errors name the file."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is not valid JSON ({exc}); delete it and rerun the command that wrote it") from None


def file_record(path: Path) -> dict[str, object]:
    """Size and SHA-256 of one file."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    return {"bytes": path.stat().st_size, "sha256": digest.hexdigest()}


CODE_FOLDERS = ("patching", "tasks", "graphs", "reports")


def source_fingerprint(root: Path) -> str:
    """sha256 (16 hex) over the package's Python sources below `root`: its own top-level files and every file
    of `CODE_FOLDERS`, sub-folders included (a change to `graphs/groundtruth/verify.py` counts too)."""
    files = sorted(root.glob("*.py"))
    for folder in CODE_FOLDERS:
        files += sorted((root / folder).rglob("*.py"))
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.relative_to(root).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


@lru_cache(maxsize=1)
def code_version() -> str:
    """The fingerprint of circuitlab's own source (`source_fingerprint`, once per process): keys runs, resumable
    stages and grid cells, so any code change re-addresses them."""
    return source_fingerprint(Path(__file__).resolve().parent.parent)


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


def check_writable(directory: str | os.PathLike[str], *, shown: str | None = None) -> Path:
    """Create `directory` and prove it is writable; a clear error otherwise, naming `shown` (default: the
    directory) and leaving no folder it created behind."""
    directory = Path(directory)
    missing = [p for p in [directory, *directory.parents] if not p.exists()]
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        for folder in missing:
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise ConfigError(f"cannot write to output directory {shown or str(directory)!r} ({exc.strerror or exc}); "
                          "choose another --out") from None
    return directory
