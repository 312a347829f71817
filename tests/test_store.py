"""reports.store: the one code fingerprint and the one writability probe."""

import hashlib
import os
import shutil
from pathlib import Path

import pytest

from circuitlab.reports import store
from circuitlab.reports.config import ConfigError


def test_code_fingerprint_sees_every_source_file(tmp_path):
    (tmp_path / "graphs" / "groundtruth").mkdir(parents=True)
    (tmp_path / "__init__.py").write_text("x = 1\n")
    (tmp_path / "graphs" / "circuit.py").write_text("y = 1\n")
    nested = tmp_path / "graphs" / "groundtruth" / "verify.py"
    nested.write_text("z = 1\n")
    (tmp_path / "notes.txt").write_text("not code")
    before = store.source_fingerprint(tmp_path)
    (tmp_path / "notes.txt").write_text("still not code")
    assert store.source_fingerprint(tmp_path) == before
    nested.write_text("z = 2\n")  # a file in a sub-folder of a code folder is code too
    assert store.source_fingerprint(tmp_path) != before


def _own_hash(root: Path) -> str:
    """An independent hash of the package's code: every `.py` file found by walking the tree ourselves, outside
    `tests/`, `bench/` and hidden folders, top-level files first, then folder by folder (the rule `source_fingerprint` documents)."""
    found = []
    for folder, subfolders, names in os.walk(root):
        here = Path(folder).relative_to(root)
        subfolders[:] = [d for d in subfolders if not d.startswith((".", "__pycache__"))
                         and not (here == Path(".") and d in ("tests", "bench"))]
        found += [(here / n).as_posix() for n in names if n.endswith(".py")]
    folders = {n.split("/")[0] for n in found if "/" in n}
    assert folders == set(store.CODE_FOLDERS), folders  # every folder holding code is hashed
    order = sorted(n for n in found if "/" not in n)
    for folder in store.CODE_FOLDERS:
        order += sorted(n for n in found if n.startswith(folder + "/"))
    digest = hashlib.sha256()
    for name in order:
        digest.update(name.encode())
        digest.update((root / name).read_bytes())
    return digest.hexdigest()[:16]


def test_code_version_hashes_the_installed_sources_and_follows_their_changes(tmp_path, monkeypatch):
    root = Path(store.__file__).resolve().parent.parent
    assert store.code_version() == _own_hash(root)
    copy = tmp_path / "circuitlab"
    shutil.copytree(root, copy, ignore=shutil.ignore_patterns(".git", "__pycache__", "tests", "bench", "*.md"))
    monkeypatch.setattr(store, "__file__", str(copy / "reports" / "store.py"))  # code_version of the copy
    store.code_version.cache_clear()
    try:
        assert store.code_version() == _own_hash(root)  # same sources, same version: content, not location
        (copy / "README.md").write_text("docs are not code")
        (copy / "tests").mkdir()
        (copy / "tests" / "test_new.py").write_text("x = 1\n")
        store.code_version.cache_clear()
        assert store.code_version() == _own_hash(root)
        with (copy / "tasks" / "base.py").open("a") as f:
            f.write("\n# an edit\n")
        store.code_version.cache_clear()
        edited = store.code_version()
        assert edited != _own_hash(root) and edited == _own_hash(copy)
    finally:
        store.code_version.cache_clear()


def test_unwritable_output_names_it_and_leaves_nothing(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(ConfigError, match="'my-out'"):
        store.check_writable(blocker / "a" / "b", shown="my-out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]
    made = store.check_writable(tmp_path / "new" / "deeper")
    assert made.is_dir() and list(made.iterdir()) == []
