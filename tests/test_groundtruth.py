"""Ground-truth models: committed artefacts load, reach their accuracy, and ablations confirm the circuits."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json

import pytest
import torch
from safetensors.torch import load_file

from circuitlab.graphs.groundtruth import MODELS_DIR, list_groundtruth, load_groundtruth, read_circuit
from circuitlab.graphs.groundtruth import verify
from circuitlab.graphs.groundtruth.build import resample_head_logits, zero_head_logits
from circuitlab.patching.components import hook_name, parse_edge, parse_node

ANALYTIC = ["induction_handwired", "tracr_reverse", "tracr_frac_prevs"]
ALL = ANALYTIC + ["planted_marker"]


@pytest.fixture(scope="module")
def gts():
    torch.set_num_threads(1)
    return {name: load_groundtruth(name) for name in ALL}


def _batch(gt, n=128, seed=7):
    return gt.make_pairs(n, seed=seed)


def _run(model, tokens):
    with torch.no_grad():
        return model(tokens)


def test_list_and_files():
    assert set(ALL) <= set(list_groundtruth())
    for name in ALL:
        folder = MODELS_DIR / name
        for f in ("card.md", "circuit.json", "task.json", "circuitlab-native.json", "model.safetensors"):
            assert (folder / f).is_file(), f"{name}: missing {f}"
        assert (folder / "model.safetensors").stat().st_size < 1_000_000
        circuit = read_circuit(folder / "circuit.json")
        assert {"input", "logits"} <= set(circuit["nodes"])
        assert not set(circuit["distractors"]) & set(circuit["nodes"])


def test_unknown_name_is_named():
    with pytest.raises(ValueError, match="nope"):
        load_groundtruth("nope")


@pytest.mark.parametrize("name", ALL)
def test_accuracy(gts, name):
    gt = gts[name]
    batch = _batch(gt)
    assert gt.accuracy(_run(gt.model, batch.clean), batch) >= 0.99
    assert gt.metric(_run(gt.model, batch.clean), batch) > gt.metric(_run(gt.model, batch.corrupt), batch)


@pytest.mark.parametrize("name", ANALYTIC)
def test_graph_forward_matches_model(gts, name):
    gt = gts[name]
    batch = _batch(gt, 32)
    logits, _ = verify.graph_forward(verify.weights_of(gt.model), batch.clean)
    torch.testing.assert_close(logits.float(), _run(gt.model, batch.clean), atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ANALYTIC)
def test_distractor_heads_are_active_but_inert(gts, name):
    gt = gts[name]
    batch = _batch(gt)
    clean = _run(gt.model, batch.clean)
    names = [hook_name("z", l) for l in range(gt.model.cfg.n_layers)]
    with torch.no_grad():
        _, cache = gt.model.run_with_cache(batch.clean, names_filter=lambda n: n in names)
    assert gt.distractors
    for node in gt.distractors:
        n = parse_node(node)
        z = cache[hook_name("z", n.layer)][:, :, n.head]
        assert z.abs().max() > 0.1, f"{node} is not active"
        lg = zero_head_logits(gt.model, batch.clean, n.layer, n.head)
        delta = (gt.task.readout(lg, batch) - gt.task.readout(clean, batch)).abs().max()
        assert delta < 1e-4, f"ablating distractor {node} moved the read logits by {delta}"


@pytest.mark.parametrize("name", ANALYTIC)
def test_true_components_matter(gts, name):
    gt = gts[name]
    batch = _batch(gt)
    base_acc = gt.accuracy(_run(gt.model, batch.clean), batch)
    for node in gt.true_nodes - {"input", "logits"}:
        n = parse_node(node)
        if n.kind == "head":
            lg = zero_head_logits(gt.model, batch.clean, n.layer, n.head)
        else:
            with torch.no_grad():
                lg = gt.model.run_with_hooks(batch.clean, fwd_hooks=[(hook_name("mlp_out", n.layer),
                                                                      lambda x, hook: torch.zeros_like(x))])
        assert gt.accuracy(lg, batch) < base_acc - 0.3, f"ablating true component {node} did not hurt"


@pytest.mark.parametrize("name", ANALYTIC)
def test_edges_exact(gts, name):
    """Circuit-only run reproduces the read logits; removing any one true edge changes them."""
    gt = gts[name]
    batch = _batch(gt, 64)
    w = verify.weights_of(gt.model)
    full, _ = verify.graph_forward(w, batch.clean)
    others = set(verify.all_edges(w)) - set(gt.true_edges)
    only, _ = verify.graph_forward(w, batch.clean, ablate=others)
    read = lambda lg: lg[:, batch.read_pos]  # noqa: E731
    assert (read(only) - read(full)).abs().max() < 1e-4
    for edge in gt.true_edges:
        lg, _ = verify.graph_forward(w, batch.clean, ablate={edge})
        assert (read(lg) - read(full)).abs().max() > 1e-2, f"true edge {edge} carries nothing"


def test_induction_circuit_is_the_expected_one(gts):
    assert gts["induction_handwired"].true_edges == {
        "input->a0.h0<q>", "input->a0.h0<k>", "input->a0.h0<v>", "a0.h0->a1.h0<k>",
        "input->a1.h0<q>", "input->a1.h0<v>", "a1.h0->logits"}


@pytest.mark.parametrize("name", ["tracr_reverse", "tracr_frac_prevs"])
def test_tracr_conversion_matches_tracr(gts, name):
    """The converted model's residual stream equals Tracr's own output on the exported reference inputs."""
    import numpy as np

    gt = gts[name]
    ref = np.load(MODELS_DIR / name / "tracr_export.npz")
    tokens = torch.from_numpy(ref["ref_tokens"]).long()
    d = ref["ref_final_resid"].shape[-1]
    last = f"blocks.{gt.model.cfg.n_layers - 1}.hook_resid_post"
    with torch.no_grad():
        _, cache = gt.model.run_with_cache(tokens, names_filter=lambda n: n == last)
    np.testing.assert_allclose(cache[last][..., :d].numpy(), ref["ref_final_resid"], atol=1e-4)


@pytest.mark.parametrize("name", ANALYTIC)
def test_rebuild_is_bit_identical(gts, name, tmp_path):
    from circuitlab.graphs.groundtruth.build import builders, write

    built = builders()[name]()
    folder = write(built, tmp_path / name)
    new, old = load_file(str(folder / "model.safetensors")), load_file(str(MODELS_DIR / name / "model.safetensors"))
    assert new.keys() == old.keys()
    for key in old:
        assert torch.equal(new[key], old[key]), key
    for f in ("circuit.json", "task.json"):
        assert json.loads((folder / f).read_text()) == json.loads((MODELS_DIR / name / f).read_text())


def test_planted_circuit_by_resampling(gts):
    """SIIT-planted circuit: resampling a distractor barely moves the output; resampling a true head breaks it."""
    gt = gts["planted_marker"]
    batch = _batch(gt, 256)
    clean = _run(gt.model, batch.clean)
    m_clean, m_corrupt = float(gt.metric(clean, batch)), float(gt.metric(_run(gt.model, batch.corrupt), batch))
    for layer in range(gt.model.cfg.n_layers):
        for head in range(gt.model.cfg.n_heads):
            node = f"a{layer}.h{head}"
            lg = resample_head_logits(gt.model, batch.clean, batch.corrupt, layer, head)
            effect = (m_clean - float(gt.metric(lg, batch))) / (m_clean - m_corrupt)
            if node in gt.true_nodes:
                assert effect > 0.5 and gt.accuracy(lg, batch) < 0.5, node
            else:
                assert abs(effect) < 0.05 and gt.accuracy(lg, batch) > 0.97, (node, effect)
    for node in gt.true_nodes - {"input", "logits"}:
        n = parse_node(node)
        assert gt.accuracy(zero_head_logits(gt.model, batch.clean, n.layer, n.head), batch) < 0.5


def test_planted_edges_connect_the_planted_nodes(gts):
    gt = gts["planted_marker"]
    assert gt.true_nodes == {"input", "a0.h2", "a1.h1", "logits"}
    assert "a1.h1->logits" in gt.true_edges
    assert any(e.startswith("a0.h2->a1.h1") for e in gt.true_edges)
    for edge in gt.true_edges:
        src, dst, _ = parse_edge(edge)
        assert src in gt.true_nodes and dst in gt.true_nodes


@pytest.mark.parametrize("name", ALL)
def test_circuit_graph_roundtrips_through_graphs_io(gts, name, tmp_path):
    from circuitlab.graphs.io import read_json, write_json
    from circuitlab.patching.components import edge_name

    graph = read_json(write_json(gts[name].circuit_graph(), tmp_path / "c.json"))
    edges = {edge_name(s, d, None if k == "resid" else k) for s, d, k in graph.edges(keys=True)}
    assert edges == set(gts[name].true_edges)
