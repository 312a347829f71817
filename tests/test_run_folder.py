"""A run folder is one consistent, verified result (issue 17's seven wrong cases, each as its reproduction)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from circuitlab.patching.models import boot_native_model, save_model
from circuitlab.reports.cli import main
from circuitlab.reports.save import load_result
from circuitlab.reports.summaries import ModelRecord
from tests.conftest import TINY_CONFIG

ENV = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
STOP_AT = Path(__file__).with_name("stop_at.py")  # runs the CLI and freezes it at a chosen point
QUICK = ["--task", "repeated_tokens", "--n", "4", "--task-option", "seq_len=4", "--n-boot", "20",
         "--percents", "10,100", "--method", "activation", "--resid-positions", "none", "--quiet"]


def stage_file(out: Path, stage: str) -> Path:
    """The saved table of a finished stage (CSV in older layouts, Parquet now)."""
    return next(p for p in sorted(out.glob(f".partial/*/{stage}*")) + sorted(out.glob(f".partial/*/{stage}/*"))
                if p.is_file() and p.suffix in (".csv", ".parquet"))


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and ".partial" not in p.parts}


def _run(*args, **kwargs):
    return subprocess.run([sys.executable, "-m", "circuitlab.reports.cli", *args], capture_output=True, text=True,
                          env=ENV, **kwargs)


def test_model_resaved_at_the_same_path_starts_fresh(tmp_path, capsys):
    model_dir, out = tmp_path / "model", tmp_path / "out"
    save_model(boot_native_model(TINY_CONFIG), model_dir)
    args = ["run", "--model", str(model_dir), "--out", str(out), *QUICK]
    assert main(args) == 0
    first = (out / "scores.csv").read_text()
    save_model(boot_native_model(dict(TINY_CONFIG, seed=1)), model_dir)  # a different model, same folder
    assert main([a for a in args if a != "--quiet"]) == 0
    record = json.loads((out / "run.json").read_text())
    assert record["resumed_stages"] == []
    assert (out / "scores.csv").read_text() != first
    said = capsys.readouterr().out
    assert "starting fresh" in said and "the model's weights" in said


def test_failed_rerun_leaves_the_previous_result_untouched(tiny_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["run", "--model", tiny_dir, "--out", str(out), *QUICK]) == 0
    before = _files(out)
    capsys.readouterr()
    assert main(["run", "--model", tiny_dir, "--out", str(out), *QUICK, "--seed", "5", "--threshold", "1e9"]) != 0
    assert _files(out) == before  # no new pairs/scores mixed with the old record
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "untouched" in err[0] and f".{out.name}.staging" in err[0], err
    assert main(["report", str(out)]) == 0

    path_out = tmp_path / "path"
    path_args = ["path", "--task", "repeated_tokens", "--model", tiny_dir, "--n", "3", "--out", str(path_out),
                 "--quiet", "--senders", "a0.h1", "--channel", "logits"]
    assert main(path_args) == 0
    before = _files(path_out)
    assert main(path_args[:-4] + ["--seed", "3", "--senders", "a0.h1", "--receivers", "a7.h0", "--channel", "q"]) != 0
    assert _files(path_out) == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".path")]  # nothing partial left by the sweep


def test_no_stale_optional_outputs(tiny_dir, tmp_path):
    out = tmp_path / "out"
    assert main(["run", "--model", tiny_dir, "--out", str(out), *QUICK]) == 0
    assert (out / "roles.csv").is_file()
    assert main(["run", "--model", tiny_dir, "--out", str(out), *QUICK, "--no-roles"]) == 0
    assert not (out / "roles.csv").exists()
    record = json.loads((out / "run.json").read_text())
    assert "roles.csv" not in record["outputs"] and set(record["outputs"]) | set(record["rendered"]) == set(_files(out)) - {"run.json"}


def test_model_record_is_typed_and_older_run_folders_still_load(tiny_dir, tmp_path):
    """run.json's `model` is read back as a `ModelRecord` that writes the same JSON; a folder saved before the
    engine, the held-out split and the grouped-query/parallel fields were recorded still loads and renders."""
    out = tmp_path / "out"
    assert main(["run", "--model", tiny_dir, "--out", str(out), *QUICK]) == 0
    saved = json.loads((out / "run.json").read_text())["model"]
    result = load_result(out)
    assert isinstance(result.model, ModelRecord) and result.model.n_layers == TINY_CONFIG["n_layers"]
    assert result.model.n_key_value_heads == TINY_CONFIG["n_heads"]
    assert result.model.heldout_split == "seed"  # repeated_tokens records no templates: another seed
    assert json.dumps(result.record()["model"]) == json.dumps(saved)  # same keys, order and values
    record = json.loads((out / "run.json").read_text())
    for key in ("engine", "heldout_split", "parallel_attn_mlp", "n_key_value_heads"):
        record["model"].pop(key)
    (out / "run.json").write_text(json.dumps(record))
    old = load_result(out)
    assert old.model.engine is None and old.model.heldout_split is None and not old.model.parallel_attn_mlp
    assert old.model.n_key_value_heads == TINY_CONFIG["n_heads"]  # no grouped heads: one key/value head per head
    assert "engine" not in old.record()["model"] and "heldout_split" not in old.record()["model"]
    assert main(["report", str(out)]) == 0


def _fake_cache(folder: Path, fill: int) -> None:
    """A cache entry shaped like the SmolLM2 one (marker with the weights' SHA-256), 2 MB of weights."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    (folder / "tokenizer.json").write_text("{}")
    weights = folder / "model.safetensors"
    weights.write_bytes(bytes([fill]) * (2 << 20))
    import hashlib

    (folder / "circuitlab-cache.json").write_text(json.dumps({
        "version": 1, "source": "test", "weights_bytes": weights.stat().st_size,
        "weights_sha256": hashlib.sha256(weights.read_bytes()).hexdigest()}))


def test_model_cache_corrupted_in_place_is_rebuilt(tmp_path, monkeypatch):
    from circuitlab.patching import models

    monkeypatch.setenv("CIRCUITLAB_CACHE", str(tmp_path))
    folder = tmp_path / models.DEFAULT_MODEL
    _fake_cache(folder, fill=7)
    builds = []
    monkeypatch.setattr(models, "_build_smollm2", lambda gguf, target: (builds.append(target), _fake_cache_files(target)),
                        raising=False)
    assert models.smollm2_cache_dir() == folder and builds == []  # a good cache is used as it is
    time.sleep(0.05)
    with open(folder / "model.safetensors", "r+b") as handle:  # zeros inside the weights, same size
        handle.seek(1 << 20)
        handle.write(b"\0" * (512 << 10))
    assert models.smollm2_cache_dir() == folder
    weights = (folder / "model.safetensors").read_bytes()
    marker = json.loads((folder / "circuitlab-cache.json").read_text())
    import hashlib

    assert hashlib.sha256(weights).hexdigest() == marker["weights_sha256"]  # verified or rebuilt, never used as is
    assert len(builds) == 1


def _fake_cache_files(target: Path) -> None:
    (target / "config.json").write_text("{}")
    (target / "tokenizer.json").write_text("{}")
    (target / "model.safetensors").write_bytes(b"\1" * (2 << 20))


def test_truncated_files_are_refused(tiny_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["run", "--model", tiny_dir, "--out", str(out), *QUICK, "--no-roles"]) == 0
    scores = (out / "scores.csv").read_text()
    (out / "scores.csv").write_text("\n".join(scores.splitlines()[:-3]) + "\n")  # cut off
    capsys.readouterr()
    assert main(["report", str(out)]) != 0
    err = capsys.readouterr().err
    assert "scores.csv" in err and "bytes" in err

    (out / "scores.csv").write_text(scores)
    stage = stage_file(out, "exact")
    data = stage.read_bytes()
    stage.write_bytes(data[: len(data) * 2 // 3])  # a truncated stage file
    assert main(["run", "--model", tiny_dir, "--out", str(out), *[a for a in QUICK if a != "--quiet"],
                 "--no-roles"]) == 0
    assert stage.name in capsys.readouterr().out
    assert (out / "scores.csv").read_text() == scores  # recomputed, not resumed from the cut-off file


def test_huge_n_is_refused_before_any_work(tiny_dir, tmp_path, monkeypatch, capsys):
    import circuitlab.reports.resume as resume

    def generate_all(*args, **kwargs):  # the only place n prompt pairs are made
        raise AssertionError("n prompt pairs were generated before --n was checked")

    monkeypatch.setattr(resume, "split_prompts", generate_all)  # where the run calls it
    code = main(["run", "--model", tiny_dir, "--out", str(tmp_path / "o"), "--task", "repeated_tokens",
                 "--task-option", "seq_len=8", "--n", "1000000000", "--quiet"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "--n 1000000000" in lines[0], lines
    assert not (tmp_path / "o").exists()


def test_second_run_into_a_busy_folder_fails_at_once(tiny_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    first = subprocess.Popen([sys.executable, str(STOP_AT), "stage", "pairs", "--", "run", "--model", tiny_dir, "--out",
                              str(out), *QUICK], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 300
        while not list(tmp_path.glob("**/pairs.done")):
            assert first.poll() is None, first.stderr.read().decode()
            assert time.time() < deadline, "the first run never finished its pairs stage"
            time.sleep(0.1)
        import circuitlab.reports.run as run

        def load(*args, **kwargs):  # failing "at once" means before any work, the model load included
            raise AssertionError("the second run loaded the model before finding the folder busy")

        monkeypatch.setattr(run, "load_model", load)  # where the run calls it
        assert main(["run", "--model", tiny_dir, "--out", str(out), *QUICK]) != 0
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "in use by another circuitlab run" in err[0] and str(out) in err[0]
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
