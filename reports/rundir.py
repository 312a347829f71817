"""Output folders that always hold one consistent, verified result.

A run never writes into its `--out` folder directly. It holds a lock on the folder (`.<name>.lock` next to
it: a second run into the same folder fails at once), writes everything into a staging folder next to it
(`.<name>.staging`), and only when every output is written swaps the staging folder with the previous result
in one rename. A failed or killed run leaves the previous result untouched; its staging folder keeps the
finished stages for resuming. The run record (`run.json`) lists every output with its size and SHA-256, and
`verify_outputs` refuses a folder whose files no longer match.

An output folder never loses a file the user made (`resolve_out`, `check_kind`): a command refuses a folder that
holds another kind of circuitlab result (run / patch / path / sweep / phase, `result_kind`), or files its own
result did not write (named; `--force` replaces them), and a symlinked `--out` is resolved first, so the link
stays a link and the staging folder, lock and swap happen next to its target.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import json
import os
import shutil
from pathlib import Path
from transformer_lens.model_bridge import TransformerBridge
from typing import Iterator

from circuitlab.reports.config import ConfigError
from circuitlab.reports.store import check_writable, file_record, write_json

RECORD = "run.json"
_RENAME_EXCHANGE = 2


def manifest(folder: Path, names: list[str] | None = None) -> dict[str, dict[str, object]]:
    """{relative path: {bytes, sha256}} of the named files (default: every file in `folder` except run.json
    and hidden ones)."""
    if names is None:
        names = sorted(str(p.relative_to(folder)) for p in folder.rglob("*")
                       if p.is_file() and p.name != RECORD and not any(part.startswith(".")
                                                                       for part in p.relative_to(folder).parts))
    return {name: file_record(folder / name) for name in names}


def record_rendered(folder: Path, names: list[str]) -> None:
    """List the rendered report files (report.html, report.md, figures) in the run record as well."""
    record = read_record(folder)
    record["rendered"] = manifest(folder, names)
    write_json(folder / RECORD, record)


def mismatch(folder: Path, name: str, expected: dict[str, object]) -> str | None:
    """Why `folder/name` does not match its record (None when it matches)."""
    path = folder / name
    if not path.is_file():
        return f"{path} is missing"
    size = path.stat().st_size
    if size != expected.get("bytes"):
        return f"{path} has {size} bytes, the run record says {expected.get('bytes')} (cut off or changed)"
    if file_record(path)["sha256"] != expected.get("sha256"):
        return f"{path} does not match the SHA-256 in the run record (changed after the run)"
    return None


def read_record(folder: Path) -> dict[str, object]:
    """The run record of a finished folder (errors name the file and what to do)."""
    path = folder / RECORD
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: {folder} is not a finished circuitlab result "
                                "(rerun the command that makes it)")
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is not valid JSON ({exc}); rerun the command that made {folder}") from None
    if not isinstance(record, dict):
        raise ValueError(f"{path} does not hold a run record; rerun the command that made {folder}")
    return record


def verify_outputs(folder: Path, record: dict[str, object]) -> None:
    """Refuse a folder whose files do not match the sizes and SHA-256s in its run record."""
    for name, expected in (record.get("outputs") or {}).items():
        problem = mismatch(folder, name, expected)
        if problem:
            raise ValueError(f"{problem}; refusing to use it: rerun the command that made {folder} "
                             f"({record.get('command', 'see run.json')})")


# ---------------------------------------------------------------------- locking

def lock_path(out: Path) -> Path:
    return out.parent / f".{out.name}.lock"


def staging_path(out: Path) -> Path:
    return out.parent / f".{out.name}.staging"


@contextlib.contextmanager
def locked(out: Path) -> Iterator[None]:
    """Hold the lock of output folder `out`; a second holder fails at once, naming the folder."""
    path = lock_path(out)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                owner = os.read(fd, 64).decode(errors="replace").strip() or "another process"
            finally:
                os.close(fd)
            raise RuntimeError(f"output folder {out} is in use by another circuitlab run (pid {owner}); wait for "
                               "it to finish or choose another --out") from None
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the previous holder removed the file between our open and lock: take the new one
    try:
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
        os.close(fd)


# ---------------------------------------------------------------------- the folder itself

KINDS = ("run", "patch", "path", "sweep", "phase")


def result_kind(folder: Path) -> str | None:
    """What kind of circuitlab result `folder` holds: `run`/`patch`/`path` (the `kind` in its run.json; a record
    without one is a run), `sweep` (sweep.json), `phase` (summary.json and checkpoints.csv), else None."""
    if (folder / RECORD).is_file():
        try:
            record = json.loads((folder / RECORD).read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError, OSError):
            return "run"
        return str(record.get("kind") or "run") if isinstance(record, dict) else "run"
    if (folder / "sweep.json").is_file():
        return "sweep"
    if (folder / "summary.json").is_file() and (folder / "checkpoints.csv").is_file():
        return "phase"
    return None


def foreign_files(folder: Path) -> list[str]:
    """Files (and empty folders) in a finished run/patch/path folder that its run record does not list."""
    try:
        record = json.loads((folder / RECORD).read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError, OSError):
        record = {}
    record = record if isinstance(record, dict) else {}
    known = set(record.get("outputs") or {}) | set(record.get("rendered") or {}) | {RECORD}
    out = []
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if rel.parts[0] == ".partial":  # saved stages, ours
            continue
        if path.is_dir():
            if not any(path.iterdir()):
                out.append(f"{rel}/")
        elif str(rel) not in known:
            out.append(str(rel))
    return out


def real_out(out: str | os.PathLike[str]) -> Path:
    """`--out` as an absolute path with any symlink resolved (the link is left as it is)."""
    path = Path(out).expanduser().absolute()
    if path.is_symlink() or any(p.is_symlink() for p in path.parents):
        target = path.resolve()
        if path.is_symlink() and not target.exists() and not target.parent.is_dir():
            raise ConfigError(f"--out {str(out)!r} is a symlink to {target}, whose folder does not exist; "
                              "fix the link or choose another --out")
        return target
    return path


def check_kind(out: str | os.PathLike[str], kind: str) -> Path:
    """Refuse an output folder that holds another kind of circuitlab result (naming it); returns the real path."""
    path = real_out(out)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"--out {str(out)!r} is a file, not a folder; choose another --out")
    found = result_kind(path) if path.is_dir() else None
    if found is not None and found != kind:
        raise ConfigError(f"--out {str(out)!r} holds a circuitlab {found} result, and `circuitlab {kind}` would "
                          f"{'mix its files into it' if kind in ('sweep', 'phase') else 'replace it'}; "
                          "choose another --out")
    return path


def resolve_out(out: str | os.PathLike[str], kind: str = "run", *, force: bool = False) -> Path:
    """Check `--out` before any work and return the folder to write (symlinks resolved): its parent must be
    writable, and an existing folder must be a finished result of this `kind` holding nothing its run record
    does not list (`force` replaces such files), since it is replaced as a whole."""
    path = check_kind(out, kind)
    if path.is_dir() and not (path / RECORD).is_file() and [p for p in path.iterdir() if p.name != ".partial"]:
        raise ConfigError(f"--out {str(out)!r} holds files that are not a finished circuitlab result and would be "
                          "replaced; choose a new or empty folder")
    if path.is_dir() and (path / RECORD).is_file() and not force:
        foreign = foreign_files(path)
        if foreign:
            shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
            raise ConfigError(f"--out {str(out)!r} holds files this {kind} did not write ({shown}); they would be "
                              "deleted when the new result replaces the folder: move them out, choose another "
                              "--out, or pass --force to replace them")
    check_writable(path.parent, shown=str(out))
    return path


def fresh_staging(out: Path, keep: str | None = None) -> Path:
    """The staging folder of `out`, emptied except for `.partial/<keep>` (saved stages of a failed run)."""
    staging = staging_path(out)
    staging.mkdir(exist_ok=True)
    for child in staging.iterdir():
        if child.name == ".partial" and child.is_dir():
            for sub in child.iterdir():
                if sub.name != keep:
                    _remove(sub)
        else:
            _remove(child)
    return staging


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def discard_if_empty(out: Path) -> bool:
    """Remove the staging folder when it holds no finished stage (nothing worth resuming); True if removed."""
    staging = staging_path(out)
    if not staging.is_dir():
        return True
    if list(staging.glob(".partial/*/*.done")):
        return False
    shutil.rmtree(staging, ignore_errors=True)
    return True


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE); False where the system cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    result = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE)
    if result == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def publish(out: Path) -> None:
    """Replace `out` by its finished staging folder in one step (the previous result is removed after)."""
    staging = staging_path(out)
    if out.exists() and _exchange(staging, out):
        shutil.rmtree(staging)
        return
    if out.exists():  # no atomic exchange here: move the old result aside first
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
        os.replace(staging, out)
        shutil.rmtree(old)
        return
    os.replace(staging, out)


def annotate(exc: BaseException, *, prefix: str = "", suffix: str = "") -> BaseException:
    """Add context to an error's one-line message in place (its type, and so the exit status, is kept)."""
    if len(exc.args) == 1 and isinstance(exc.args[0], str) and not isinstance(exc, KeyError):
        exc.args = (f"{prefix}{exc.args[0]}{suffix}",)
    elif isinstance(exc, Exception) and not isinstance(exc, KeyboardInterrupt):
        exc.args = (f"{prefix}{exc}{suffix}",)
    return exc


def available_bytes() -> int | None:
    """Memory the system can give this process now (MemAvailable), or None where unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_context(seq_len: int, model: TransformerBridge, name: str) -> None:
    """Refuse prompts longer than the model's context (`cfg.n_ctx`), naming both, before any work."""
    limit = int(getattr(model.cfg, "n_ctx", 0) or 0)
    if limit and seq_len > limit:
        raise ConfigError(f"the longest prompt has {seq_len} tokens, more than the {limit}-token context of {name}; "
                          "use shorter prompts (fewer tokens per row / a smaller seq_len)")


def check_n(n: int, held_per_pair: float, batch_per_pair: float, memory_budget_mb: float, what: str) -> None:
    """Refuse `--n` before anything of size n is allocated: when what the run holds for all its prompts
    (`held_per_pair` bytes each: `what`) exceeds the machine's free memory, or when even a batch of one prompt
    (`batch_per_pair` bytes) exceeds `--memory-budget`."""
    if batch_per_pair > memory_budget_mb * 2**20:
        raise ConfigError(f"one prompt pair needs about {batch_per_pair / 2**20:,.0f} MB per batched forward, more "
                          f"than --memory-budget {memory_budget_mb:g} MB; raise --memory-budget to at least "
                          f"{batch_per_pair / 2**20:,.0f}")
    need_mb = n * held_per_pair / 2**20
    free = available_bytes()
    if free is not None and n * held_per_pair > 0.8 * free:
        raise ConfigError(f"--n {n} needs about {need_mb:,.0f} MB for {what} ({held_per_pair / 2**10:,.1f} KB per "
                          f"prompt pair) but this machine has {free / 2**20:,.0f} MB free; use --n "
                          f"{max(1, int(0.8 * free // held_per_pair))} or less")
