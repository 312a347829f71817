"""Output folders never lose a file the user made (issue 26's three wrong cases, each as its reproduction)."""

import json
import os

import pytest

from circuitlab.reports.cli import main

QUICK = ["--task", "repeated_tokens", "--n", "4", "--task-option", "seq_len=4", "--n-boot", "20",
         "--percents", "10,100", "--method", "activation", "--resid-positions", "none", "--no-roles", "--quiet"]
PATCH = ["--task", "repeated_tokens", "--n", "4", "--quiet"]


@pytest.fixture(scope="module")
def finished(tiny_dir, tmp_path_factory):
    """A finished discovery run folder (copied by each test that changes it)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    assert main(["run", "--model", tiny_dir, "--out", str(out), *QUICK]) == 0
    return out


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def _tree(folder):
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None)
            for p in sorted(folder.rglob("*"))}


def test_rerun_refuses_a_run_folder_holding_user_files(tiny_dir, finished, tmp_path, capsys):
    out = _copy(finished, tmp_path / "run")
    (out / "notes.txt").write_text("my notes")
    (out / "analysis").mkdir()
    (out / "analysis" / "plot.py").write_text("print(1)")
    before = _tree(out)
    capsys.readouterr()
    assert main(["run", "--model", tiny_dir, "--out", str(out), *QUICK]) == 2
    err = capsys.readouterr().err
    assert "notes.txt" in err and "analysis/plot.py" in err and "--force" in err, err
    assert _tree(out) == before
    assert main(["run", "--model", tiny_dir, "--out", str(out), *QUICK, "--force"]) == 0  # asked for: replaced
    assert not (out / "notes.txt").exists() and (out / "run.json").is_file()


def test_out_symlink_to_a_run_is_resolved_and_a_failure_leaves_it_as_it_was(tiny_dir, finished, tmp_path,
                                                                             monkeypatch):
    target = _copy(finished, tmp_path / "real")
    link = tmp_path / "link"
    link.symlink_to(target, target_is_directory=True)
    before = _tree(target)
    from circuitlab.reports import run as run_module

    def fail(cfg, out, *args, **kwargs):  # a failure while running, after the staging folder exists
        (run_module.rundir.staging_path(out) / "half.txt").write_text("half")
        raise RuntimeError("simulated failure")

    with monkeypatch.context() as m:
        m.setattr(run_module, "_run", fail)
        assert main(["run", "--model", tiny_dir, "--out", str(link), *QUICK]) == 1
    assert link.is_symlink() and os.readlink(link) == str(target) and _tree(target) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "real"]
    # a good rerun through the link: the link still points at the target, which holds the new result
    for seed in ("1", "2"):
        assert main(["run", "--model", tiny_dir, "--out", str(link), *QUICK, "--seed", seed]) == 0
        assert link.is_symlink() and os.readlink(link) == str(target)
        assert json.loads((target / "run.json").read_text())["config"]["seed"] == int(seed)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "real"]


@pytest.mark.parametrize("command", ["patch", "path", "sweep"])
def test_other_kinds_of_result_are_refused_naming_the_kind(tiny_dir, finished, tmp_path, capsys, command):
    out = _copy(finished, tmp_path / "run")
    before = _tree(out)
    capsys.readouterr()
    if command == "sweep":
        spec = tmp_path / "sweep.yaml"
        spec.write_text(f"kind: run\ngrid:\n  seed: [0]\noptions:\n  model: {tiny_dir}\n  task: repeated_tokens\n"
                        "  n: 4\n  method: activation\n")
        rc = main(["sweep", str(spec), "--out", str(out)])
    elif command == "patch":
        rc = main(["patch", "--model", tiny_dir, "--out", str(out), *PATCH])
    else:
        rc = main(["path", "--model", tiny_dir, "--out", str(out), *PATCH, "--channel", "logits"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "holds a circuitlab run result" in err and command in err, err
    assert _tree(out) == before
    patch_out = tmp_path / "patch"
    assert main(["patch", "--model", tiny_dir, "--out", str(patch_out), *PATCH]) == 0
    assert main(["run", "--model", tiny_dir, "--out", str(patch_out), *QUICK]) == 2
    assert "holds a circuitlab patch result" in capsys.readouterr().err
