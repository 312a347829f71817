"""`circuitlab run --validation-n`: discovery, validation and held-out pairs from pairwise disjoint templates, the
circuit's size chosen on the validation pairs too, and its validation faithfulness recorded; checked on the tiny
model with a pair file of six templates (the tiny model has no tokenizer, so the rows are token ids)."""

import json
import random

import pytest
import torch

from circuitlab.graphs.evaluate import Ablator
from circuitlab.patching.edges import evaluate_edge_masks, prepare_edges
from circuitlab.patching.models import load_model
from circuitlab.reports.cli import main
from circuitlab.reports.save import load_result
from circuitlab.tasks import get_task
from circuitlab.tasks.split import validation_split

N, N_VAL, N_HELD = 6, 4, 4
FAST = ["--n", str(N), "--heldout-n", str(N_HELD), "--n-boot", "50", "--percents", "10,100", "--oracle-edges", "10",
        "--resid-positions", "none", "--no-roles", "--steps", "2", "--quiet"]


def _rows(templates=6, per_template=7, length=6):
    """Token-id rows of one length: template t fixes the first two tokens, the corrupt prompt differs at 2."""
    rows, rng = [], random.Random(0)
    for i in range(templates * per_template):
        t = i % templates
        clean = [3 + t, 20 + t] + [rng.randrange(64) for _ in range(length - 2)]
        corrupt = list(clean)
        corrupt[2] = (clean[2] + 17) % 64
        answer = rng.randrange(64)
        rows.append({"clean_ids": clean, "corrupt_ids": corrupt, "answer_ids": [answer],
                     "wrong_ids": [(answer + 1 + rng.randrange(63)) % 64], "positions": {"X": 2},
                     "meta": {"template": f"t{t}"}})
    return rows


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _hook_faithfulness(model, val, heads):
    """Faithfulness of a head circuit on the pairs `val`, by `graphs.evaluate.Ablator` (TransformerLens hooks: every
    head outside the circuit gets its corrupt-run `hook_z`, MLPs recomputed) and a logit difference in plain torch."""
    end, rows = val.positions["END"], torch.arange(len(val))

    def logit_diff(logits):
        at = logits[rows, end]
        return float((at[rows, val.answer_ids[:, 0]] - at[rows, val.wrong_ids[:, 0]]).double().mean())

    with torch.no_grad():
        clean, corrupt = logit_diff(model(val.clean_tokens)), logit_diff(model(val.corrupt_tokens))
    ablator = Ablator(model, val.clean_tokens, val.corrupt_tokens, logit_diff, ablation="corrupt")
    kept = ablator.metric_with(list(heads) + [c for c in ablator.components if c.startswith("m")])
    return (kept - corrupt) / (clean - corrupt)


@pytest.fixture(scope="module")
def validated_run(tiny_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("validated")
    data = _write(root / "six_templates.jsonl", _rows())
    out = root / "run"
    assert main(["run", "--task", str(data), "--model", tiny_dir, "--out", str(out), "--validation-n", str(N_VAL),
                 "--faithfulness-target", "0.5", *FAST]) == 0  # 0.5: a circuit of some heads, not all (f = 1 trivially)
    return data, out


def test_validation_run_splits_prompts_by_template_three_ways(validated_run):
    _, out = validated_run
    parts = {name: _lines(out / f"{name}.jsonl") for name in ("pairs", "validation_pairs", "heldout_pairs")}
    assert [len(parts[k]) for k in ("pairs", "validation_pairs", "heldout_pairs")] == [N, N_VAL, N_HELD]
    templates = {k: {p["meta"]["template"] for p in v} for k, v in parts.items()}
    texts = {k: {tuple(p["clean_ids"]) for p in v} for k, v in parts.items()}
    names = list(parts)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not templates[a] & templates[b], (a, b)
            assert not texts[a] & texts[b], (a, b)
    record = json.loads((out / "run.json").read_text())
    split = record["split"]
    assert split["how"] == "discovery/validation/held-out by template"
    assert (split["discovery"], split["validation"], split["heldout"]) == (N, N_VAL, N_HELD)
    assert set(split["discovery_templates"]) == templates["pairs"]
    assert set(split["validation_templates"]) == templates["validation_pairs"]
    assert set(split["heldout_templates"]) == templates["heldout_pairs"]
    assert record["config"]["validation_n"] == N_VAL and "--validation-n 4" in record["command"]
    assert record["model"]["heldout_split"] == "validation"
    summary = record["circuit_faithfulness"]
    assert summary["n_validation"] == N_VAL and summary["n_heldout"] == N_HELD and summary["n_discovery"] == N
    report = (out / "report.md").read_text()
    assert f"{N_VAL} validation pairs" in report and f"validation {summary['validation']:.3f}" in report
    assert "neither the discovery nor the validation pairs use" in report
    # the saved result reads back (validation pairs, split) and re-renders the same statement
    result = load_result(out)
    assert result.prompt_split.to_dict() == split and len(result.validation_pairs) == N_VAL
    assert result.faithful.to_dict() == summary
    assert main(["report", str(out)]) == 0 and f"validation {summary['validation']:.3f}" in (out / "report.md").read_text()


def test_validation_run_resumes_from_its_stages(validated_run, tiny_dir):
    """The same command again resumes every stage (the resume key covers the validation pairs) with the same
    circuit and validation faithfulness."""
    data, out = validated_run
    before = json.loads((out / "run.json").read_text())
    assert main(["run", "--task", str(data), "--model", tiny_dir, "--out", str(out), "--validation-n", str(N_VAL),
                 "--faithfulness-target", "0.5", *FAST]) == 0
    after = json.loads((out / "run.json").read_text())
    assert {"pairs", "circuit"} <= set(after["resumed_stages"]) and after["split"] == before["split"]
    assert after["circuit_faithfulness"] == before["circuit_faithfulness"]


def test_recorded_validation_faithfulness_matches_plain_hook_ablation(validated_run, tiny_dir):
    """Independent check: rebuild the validation pairs with `validation_split` (same seed, every row as the pool)
    and measure the circuit with `graphs.evaluate.Ablator` (TransformerLens hooks: every head outside the circuit
    gets its corrupt-run `hook_z`, MLPs recomputed) and a logit difference written here in plain torch."""
    data, out = validated_run
    record = json.loads((out / "run.json").read_text())
    summary = record["circuit_faithfulness"]
    assert summary["level"] == "node" and summary["heads_only"] and 0 < len(summary["items"]) < 12
    model = load_model(tiny_dir)
    task = get_task(str(data))
    _, val, _ = validation_split(task, model, N, N_VAL, N_HELD, seed=0, pool_n=len(task.records))
    saved = _lines(out / "validation_pairs.jsonl")
    assert val.clean_tokens.tolist() == [p["clean_ids"] for p in saved]
    expected = _hook_faithfulness(model, val, summary["items"])
    assert summary["validation"] == pytest.approx(expected, abs=1e-4)
    assert abs(expected - 1.0) > 0.05  # a real check: the circuit does not match the full model trivially
    lo, hi = summary["validation_ci"]
    assert lo <= summary["validation"] <= hi


def test_edge_circuit_validation_faithfulness_and_prompt_batches(validated_run, tiny_dir, tmp_path):
    """An edge circuit chosen with validation pairs: its recorded validation faithfulness equals exact edge patching
    of its edges on a context built here from the rebuilt validation pairs (`patching.edges.evaluate_edge_masks`,
    the reference of tests/test_validated_selection.py); prompt batches (--memory-budget 1) give the same circuit."""
    data, _ = validated_run
    records = []
    for name, extra in (("edges", []), ("edges_batched", ["--memory-budget", "1"])):
        out = tmp_path / name
        assert main(["run", "--task", str(data), "--model", tiny_dir, "--out", str(out), "--validation-n", str(N_VAL),
                     "--method", "eap-ig", "--circuit-method", "eap-ig-edges", "--faithfulness-target", "0.5",
                     *extra, *FAST]) == 0
        records.append(json.loads((out / "run.json").read_text())["circuit_faithfulness"])
    summary, batched = records
    assert summary["level"] == "edge" and summary["n_validation"] == N_VAL
    assert batched["items"] == summary["items"]
    assert batched["validation"] == pytest.approx(summary["validation"], abs=1e-5)
    model = load_model(tiny_dir)
    task = get_task(str(data))
    _, val, _ = validation_split(task, model, N, N_VAL, N_HELD, seed=0, pool_n=len(task.records))
    ctx = prepare_edges(model, task, val)
    mask = torch.zeros(ctx.graph.n_edges)
    mask[[ctx.graph.edge_index(e) for e in summary["items"]]] = 1.0
    assert 0 < int(mask.sum()) < ctx.graph.n_edges
    f = float((evaluate_edge_masks(ctx, mask).double().mean() - ctx.corrupt_metric)
              / (ctx.clean_metric - ctx.corrupt_metric))
    assert summary["validation"] == pytest.approx(f, abs=1e-4)


def test_default_run_records_no_validation(tiny_dir, tmp_path):
    data = _write(tmp_path / "six_templates.jsonl", _rows())
    out = tmp_path / "default"
    assert main(["run", "--task", str(data), "--model", tiny_dir, "--out", str(out), *FAST]) == 0
    record = json.loads((out / "run.json").read_text())
    assert "split" not in record and "validation_n" not in record["config"]
    assert not {"validation", "validation_ci", "n_validation"} & set(record["circuit_faithfulness"])
    assert record["model"]["heldout_split"] == "templates" and not (out / "validation_pairs.jsonl").exists()
    assert "validation" not in (out / "report.md").read_text()


@pytest.mark.parametrize("args, needle", [(["--validation-n", "1"], "--validation-n must be >= 2"),
                                          (["--validation-n", "0"], "--validation-n must be >= 2")])
def test_bad_validation_n_is_refused(tmp_path, capsys, args, needle):
    assert main(["run", "--out", str(tmp_path / "x"), *args]) == 2
    assert needle in capsys.readouterr().err and not (tmp_path / "x").exists()


@pytest.mark.parametrize("task", ["repeated_tokens", "two_templates"])
def test_validation_needs_three_templates(tiny_dir, tmp_path, capsys, task):
    """A task without templates, or a pair file with two: one error naming --validation-n and what to do, raised
    while the prompts are drawn (before any forward pass), and no run folder."""
    if task == "two_templates":
        task = str(_write(tmp_path / "two.jsonl", _rows(templates=2, per_template=20)))
    out = tmp_path / "x"
    extra = ["--task-option", "seq_len=5"] if task == "repeated_tokens" else []
    code = main(["run", "--task", task, "--model", tiny_dir, "--out", str(out), "--validation-n", "4", *extra, *FAST])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--validation-n 4" in err[0] and "leave out --validation-n" in err[0], err
    assert not out.exists()


def test_greedy_refinement_is_kept_only_if_the_validation_pairs_agree(validated_run, tiny_dir, tmp_path):
    """`--method greedy` refines the validated prefix on the discovery pairs alone; with --validation-n the run keeps
    the refinement only where its validation faithfulness stays in the band, else the validated prefix (and says
    so). The recorded validation number is re-measured here with plain-hook ablation (`Ablator`)."""
    data, _ = validated_run
    out = tmp_path / "greedy"
    assert main(["run", "--task", str(data), "--model", tiny_dir, "--out", str(out), "--validation-n", str(N_VAL),
                 "--method", "greedy", "--faithfulness-target", "0.5", *FAST]) == 0
    summary = json.loads((out / "run.json").read_text())["circuit_faithfulness"]
    # on these prompts greedy's refinement (3 heads) falls to ~0.02 on the validation pairs: the prefix is kept
    assert summary["reached"] and 0.5 <= summary["validation"] <= 1.5
    assert "left the band on the validation pairs" in json.dumps(summary)
    model = load_model(tiny_dir)
    task = get_task(str(data))
    _, val, _ = validation_split(task, model, N, N_VAL, N_HELD, seed=0, pool_n=len(task.records))
    assert summary["validation"] == pytest.approx(_hook_faithfulness(model, val, summary["items"]), abs=1e-4)
