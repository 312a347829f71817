"""reports.store: the one code fingerprint and the one writability probe."""

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


def test_code_version_is_the_package_fingerprint():
    root = Path(store.__file__).resolve().parent.parent
    assert store.code_version() == store.source_fingerprint(root)


def test_unwritable_output_names_it_and_leaves_nothing(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(ConfigError, match="'my-out'"):
        store.check_writable(blocker / "a" / "b", shown="my-out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]
    made = store.check_writable(tmp_path / "new" / "deeper")
    assert made.is_dir() and list(made.iterdir()) == []
