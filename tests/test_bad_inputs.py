"""Issue 17's weak cases: each bad input gives one clear line naming it, a non-zero exit, nothing partial."""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from circuitlab.reports import store
from circuitlab.reports.cli import main
from circuitlab.reports.config import ConfigError, build_configs, load_config_file
from tests.test_run_folder import stage_file

ENV = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
QUICK = ["--task", "repeated_tokens", "--n", "4", "--task-option", "seq_len=4", "--n-boot", "20",
         "--percents", "10,100", "--method", "activation", "--resid-positions", "none", "--no-roles", "--quiet"]


def _one_error(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("circuitlab: error:"), lines
    return lines[0]


def test_unknown_model_name_fails_fast_without_hub_retries(tmp_path, capsys, monkeypatch):
    """Online, an unknown hub name costs one short probe of the hub and never a hub load (whose retries took 31 s)."""
    import urllib.error
    import urllib.request

    from huggingface_hub import constants

    from circuitlab.patching import models

    probes, loads = [], []

    def probe(url, timeout=None):
        probes.append((url, timeout))
        raise urllib.error.HTTPError(url, 404, "Not Found", {}, None)

    def load(*args, **kwargs):
        loads.append(args)
        raise AssertionError("the hub load (with its retries) ran for a name the hub does not have")

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(urllib.request, "urlopen", probe)
    monkeypatch.setattr(models.TransformerBridge, "boot_transformers", load)
    assert main(["run", "--model", "nosuch-model-xyz", "--task", "repeated_tokens", "--out", str(tmp_path / "o"),
                 "--quiet"]) != 0
    line = _one_error(capsys)
    assert "nosuch-model-xyz" in line and "no such model on the Hugging Face hub" in line, line
    assert len(probes) == 1 and probes[0][0].endswith("/api/models/nosuch-model-xyz") and probes[0][1] <= 5
    assert loads == [] and not (tmp_path / "o").exists()


def test_typo_in_model_folder_says_no_such_folder(tmp_path, capsys):
    (tmp_path / "models").mkdir()
    for name in (str(tmp_path / "models" / "tiny-modle"), "./no-such-dir/model"):
        assert main(["run", "--model", name, "--out", str(tmp_path / "o"), *QUICK]) != 0
        line = _one_error(capsys)
        assert "does not exist" in line and name in line and "hub" not in line.lower(), line


def test_early_error_leaves_no_output_folder(tmp_path, capsys):
    out = tmp_path / "o"
    assert main(["run", "--model", str(tmp_path / "missing"), "--out", str(out), *QUICK]) != 0
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_corrupt_files_are_named(tiny_dir, tmp_path, capsys):
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"\xff\xfe\x00garbage\x00\n\x81")
    with pytest.raises(ValueError, match="bad.parquet"):
        store.read_parquet(bad)
    out = tmp_path / "out"
    assert main(["run", "--model", tiny_dir, "--out", str(out), *QUICK]) == 0
    saved = stage_file(out, "exact")
    saved.write_bytes(b"\x80\x02garbage")
    assert main(["run", "--model", tiny_dir, "--out", str(out), *[a for a in QUICK if a != "--quiet"]]) == 0
    assert saved.name in capsys.readouterr().out  # named, and recomputed rather than read
    (out / "run.json").write_text("{ not json")
    assert main(["report", str(out)]) != 0
    assert "run.json" in _one_error(capsys)
    garbage = tmp_path / "model.json"
    garbage.write_text("{ cut")
    with pytest.raises(ValueError, match="model.json"):
        store.read_json(garbage)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_without_gpu(tiny_dir, tmp_path, capsys):
    for cmd in (["run", *QUICK], ["patch", "--task", "repeated_tokens", "--n", "3", "--quiet"]):
        assert main([*cmd, "--model", tiny_dir, "--device", "cuda", "--out", str(tmp_path / "o")]) == 2
        line = _one_error(capsys)
        assert "--device cuda" in line and "--device cpu" in line
    assert not (tmp_path / "o").exists()


def test_negative_seed_fails_before_work(tiny_dir, tmp_path, capsys):
    assert main(["run", "--model", tiny_dir, "--out", str(tmp_path / "o"), *QUICK, "--seed", "-1"]) == 2
    assert "--seed" in _one_error(capsys)
    assert not (tmp_path / "o").exists()


def test_negative_threshold_is_refused(tiny_dir, tmp_path, capsys):
    assert main(["run", "--model", tiny_dir, "--out", str(tmp_path / "o"), *QUICK, "--threshold", "-1"]) == 2
    assert "--threshold" in _one_error(capsys)


def test_non_boolean_roles_in_yaml(tmp_path):
    config = tmp_path / "exp.yaml"
    config.write_text('roles: "nope"\n')
    with pytest.raises(ConfigError, match="'roles' must be true or false"):
        build_configs(load_config_file(config), {})
    config.write_text("roles: no\nforce: 'yes'\n")
    cfg, = build_configs(load_config_file(config), {})
    assert cfg.roles is False and cfg.force is True


def test_empty_config_file_is_an_error(tmp_path, capsys):
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing yet\n")
    with pytest.raises(ConfigError, match="is empty"):
        load_config_file(empty)
    assert main(["run", "--config", str(empty)]) == 2
    assert "empty.yaml" in _one_error(capsys)


def test_sweep_errors_name_the_run(tiny_dir, tmp_path, capsys):
    config = tmp_path / "exp.yaml"
    config.write_text(f"model: {tiny_dir}\nruns:\n  - out: {tmp_path / 'a'}\n  - out: {tmp_path / 'b'}\n"
                      "    method: magic\n")
    with pytest.raises(ConfigError, match=r"runs\[1\] \(out .*b\): unknown method 'magic'"):
        build_configs(load_config_file(config), {})
    config.write_text(f"task: repeated_tokens\nn: 4\nn_boot: 20\npercents: '10,100'\nmethod: activation\n"
                      f"resid_positions: none\nroles: false\ntask_options: {{seq_len: 4}}\nruns:\n"
                      f"  - {{out: {tmp_path / 'a'}, model: {tiny_dir}}}\n"
                      f"  - {{out: {tmp_path / 'b'}, model: {tmp_path / 'gone'}}}\n")
    assert main(["run", "--config", str(config), "--quiet"]) != 0
    line = _one_error(capsys)
    assert "run 2 of 2" in line and str(tmp_path / "b") in line and "gone" in line


_KILLED_BUILD = """
import sys, time
from pathlib import Path
from circuitlab.patching import models
def slow(gguf, target):
    (Path(target) / "model.safetensors").write_bytes(b"x" * (8 << 20))
    time.sleep(120)
models._build_smollm2 = slow
models.smollm2_cache_dir()
"""


def test_killed_cache_build_leaves_no_hidden_folder(tmp_path, monkeypatch):
    from circuitlab.patching import models

    env = dict(ENV, CIRCUITLAB_CACHE=str(tmp_path), PYTHONPATH=os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_BUILD], env=env)
    try:
        deadline = time.time() + 60
        while not list(tmp_path.glob(".smollm2-135m-*/model.safetensors")):
            assert proc.poll() is None and time.time() < deadline
            time.sleep(0.1)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert [p for p in tmp_path.iterdir() if p.is_dir() and p.name.startswith(".")]  # the killed build's folder

    def fake(gguf, target):
        for name in ("config.json", "tokenizer.json"):
            (Path(target) / name).write_text("{}")
        (Path(target) / "model.safetensors").write_bytes(b"w" * (1 << 20))

    monkeypatch.setenv("CIRCUITLAB_CACHE", str(tmp_path))
    monkeypatch.setattr(models, "_build_smollm2", fake, raising=False)
    folder = models.smollm2_cache_dir()
    assert folder.is_dir() and (folder / "model.safetensors").stat().st_size == 1 << 20
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_report_on_a_patch_folder(tiny_dir, tmp_path, capsys):
    out = tmp_path / "p"
    assert main(["patch", "--task", "repeated_tokens", "--model", tiny_dir, "--n", "3", "--component", "mlp",
                 "--out", str(out), "--quiet"]) == 0
    assert main(["report", str(out)]) != 0
    line = _one_error(capsys)
    assert "circuitlab patch" in line and "circuitlab run`" not in line.replace("`circuitlab run` discovery", "")
    assert json.loads((out / "run.json").read_text())["outputs"]["scores.csv"]["bytes"] > 0


# ---------------------------------------------------------------------- issue 26: one clear error before any work

PATCH = ["patch", "--task", "repeated_tokens", "--n", "3", "--quiet"]
RUN_26 = [
    (["--n-boot", "1000000000"], "--n-boot"),
    (["--memory-budget", "nan"], "--memory-budget"),
    (["--memory-budget", "inf"], "--memory-budget"),
    (["--backend", "nosuch"], "--backend"),
]
PATCH_26 = [
    (["--memory-budget", "nan"], "--memory-budget"),
    (["--shards", "1000"], "--shards 1000"),
    (["--executor", "nosuch"], "--executor 'nosuch'"),
    (["--backend", "nosuch"], "--backend"),
]
PHASE_26 = [
    (["--n-heads", "0"], "--n-heads"),
    (["--n-ctx", "32"], "--n-ctx 32"),
    (["--n-ctx", "2"], "--n-ctx 2"),
    (["--eval-sequences", "0"], "--eval-sequences"),
]


@pytest.mark.parametrize("command, args, named", [("run", a, n) for a, n in RUN_26] + [("patch", a, n) for a, n in
                                                                                      PATCH_26] +
                         [("phase", a, n) for a, n in PHASE_26])
def test_bad_option_is_one_error_naming_it_before_any_work(tiny_dir, tmp_path, capsys, command, args, named):
    out = tmp_path / "o"
    if command == "run":
        argv = ["run", "--model", tiny_dir, "--out", str(out), *QUICK, *args]
    elif command == "patch":
        argv = [*PATCH, "--model", tiny_dir, "--out", str(out), *args]
    else:
        argv = ["phase", "--out", str(out), "--quiet", *args]
    assert main(argv) == 2
    assert named in _one_error(capsys)
    assert list(tmp_path.iterdir()) == []  # nothing written: no folder, staging or lock


def test_sweep_resources_and_report_on_other_kinds(tiny_dir, tmp_path, capsys):
    spec = tmp_path / "s.yaml"
    spec.write_text(f"kind: run\ngrid:\n  seed: [0]\noptions:\n  model: {tiny_dir}\nresources:\n  num_cpus: 0\n")
    assert main(["sweep", str(spec), "--out", str(tmp_path / "sw")]) == 2
    assert "num_cpus" in _one_error(capsys) and not (tmp_path / "sw").exists()
    assert main(["report", str(spec)]) != 0
    assert "is a file" in _one_error(capsys)
    (tmp_path / "sweepdir").mkdir()
    (tmp_path / "sweepdir" / "sweep.json").write_text("{}")
    assert main(["report", str(tmp_path / "sweepdir")]) != 0
    assert "circuitlab sweep result" in _one_error(capsys)


DATA_26 = [  # (file name, content, what the one error line must name)
    ("dup.yaml", "task: repeated_tokens\nn: 4\ntask: ioi\n", "key 'task' is given twice (line 3)"),
    ("dup.json", '{"task": "repeated_tokens",\n "n": 4,\n "n": 5}', "key 'n' is given twice (line 3)"),
    ("same.jsonl", json.dumps({"clean_ids": [1, 2, 3], "corrupt_ids": [1, 5, 3], "answer_ids": [7], "wrong_ids": [8]})
     + "\n" + json.dumps({"clean_ids": [1, 2, 3], "corrupt_ids": [1, 6, 3], "answer_ids": [9], "wrong_ids": [9]}),
     "row 2, field 'wrong_ids': holds 9, which is also the answer"),
    ("neg.jsonl", json.dumps({"clean_ids": [1, 2, 3], "corrupt_ids": [1, 5, 3], "answer_ids": [-1], "wrong_ids": [8]}),
     "row 1, field 'answer_ids': holds -1, out of range"),
    ("long.jsonl", json.dumps({"clean_ids": [1] * 70, "corrupt_ids": [2] * 70, "answer_ids": [7], "wrong_ids": [8]}),
     "70 tokens, more than the 64-token context"),
]


@pytest.mark.parametrize("name, content, named", DATA_26)
def test_bad_files_are_one_error_naming_the_row_or_line(tiny_dir, tmp_path, capsys, name, content, named):
    path = tmp_path / name
    path.write_text(content)
    out = tmp_path / "o"
    if name.endswith((".yaml", ".json")):
        argv = ["run", "--config", str(path), "--model", tiny_dir, "--out", str(out), "--quiet"]
    else:
        argv = ["patch", "--task", str(path), "--model", tiny_dir, "--out", str(out), "--quiet"]
    assert main(argv) == 2
    assert named in _one_error(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]


@pytest.mark.parametrize("method, what", [("eap", "edges"), ("activation", "heads and MLPs")])
def test_top_k_beyond_the_graph_is_refused_before_any_work(tmp_path, capsys, tiny_dir, method, what):
    """`--top-k 10**12` once spent minutes drawing the whole graph; now one line names the graph's size."""
    out = tmp_path / "o"
    args = ["run", "--model", tiny_dir, "--out", str(out), *QUICK, "--method", method, "--top-k", str(10**12)]
    assert main(args) != 0
    line = _one_error(capsys)
    assert f"--top-k {10**12}" in line and what in line and "--top-fraction 1" in line, line
    assert not out.exists()


def test_truncated_weights_file_is_named(tmp_path, capsys, tiny_dir):
    """A safetensors file cut short (an interrupted copy) is named by its path, with what to do."""
    model = tmp_path / "model"
    shutil.copytree(tiny_dir, model)
    weights = model / "model.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)
    out = tmp_path / "o"
    assert main(["run", "--model", str(model), "--out", str(out), *QUICK]) != 0
    line = _one_error(capsys)
    assert str(weights) in line and "truncated" in line and "copy or save the model again" in line, line
    assert not out.exists()


def test_disk_full_while_writing_says_so_and_where(tmp_path, capsys, tiny_dir, monkeypatch):
    """ENOSPC while saving a stage: one line saying the disk is full, which folder and what to do (not `[Errno 28]`)."""
    def full(self, path, *args, **kwargs):
        Path(path).write_bytes(b"PAR1")  # a partial file, as a real write would leave
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pd.DataFrame, "to_parquet", full)
    out = tmp_path / "o"
    assert main(["run", "--model", tiny_dir, "--out", str(out), *QUICK]) != 0
    line = _one_error(capsys)
    assert "the disk is full" in line and str(tmp_path) in line and "Errno" not in line, line
    assert "another disk" in line and not out.exists(), line
    assert not [p for p in tmp_path.rglob("*.tmp")]  # no half-written file left behind
