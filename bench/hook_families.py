"""The exact hook backend against the fast runner on every family, by every method (one run, tiny models).

For each family of `tests/hf_tiny.py` (2 layers, d_model 64, random init, built offline), one engine context per
backend on the same prompts (`ToyTask`), then the largest absolute difference hook vs fast of: the metric of 3
random edge circuits (`evaluate_edge_masks`), EAP scores (`eap_scores`), exact edge scores of sampled edges
(`exact_edge_scores`), activation patching at one position (resid_mid where the model has it, z, k), path patching
into two heads through q, k and v, and pattern patching at one query position (`pattern`: the difference, or
`refused` where the hook backend refuses the edit because the bridge would discard it, GPT-J and OPT on
TransformerLens 4.3). The fast runner itself is checked against naive bridge hooks in
tests/test_families.py, so equality here ties the hook backend to the same references.

Run: `OMP_NUM_THREADS=1 .venv/bin/python bench/hook_families.py [family ...]`.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch

from circuitlab.patching.activation import activation_patching
from circuitlab.patching.attribution import eap_scores, exact_edge_scores
from circuitlab.patching.edges import evaluate_edge_masks
from circuitlab.patching.engine import engine_context
from circuitlab.patching.hook_backend import DiscardedEditError, HookRunner
from circuitlab.patching.models import load_model
from circuitlab.patching.path import path_patching
from circuitlab.tests.hf_tiny import FAMILIES, build_tiny, smollm2_tokenizer
from circuitlab.tests.toy import ToyTask, toy_pairs


def _diff(a, b) -> float:
    return float(torch.as_tensor(a - b).abs().max())


def check(model) -> dict[str, float | None]:
    task, pairs = ToyTask(), toy_pairs(model.cfg.d_vocab, batch=3, seq=7, seed=1)
    fast = engine_context(model, task, pairs, check_gap=False)
    hook = engine_context(model, task, pairs, runner=HookRunner(model), check_gap=False)
    g = fast.graph
    masks = (torch.rand(3, g.n_edges, generator=torch.Generator().manual_seed(0)) > 0.5).float()
    out = {"edge_masks": _diff(evaluate_edge_masks(fast, masks), evaluate_edge_masks(hook, masks))}
    eap = eap_scores(fast)
    out["eap"], out["eap_max"] = _diff(eap, eap_scores(hook)), float(eap.abs().max())
    edges = list(range(0, g.n_edges, max(1, g.n_edges // 12)))
    out["exact_edges"] = _diff(exact_edge_scores(fast, edges), exact_edge_scores(hook, edges))
    out["activation"] = max(
        _diff(*(activation_patching(model, task, pairs, kind, positions=[3], context=c)["metric"].to_numpy()
                for c in (fast, hook)))
        for kind in ("resid_mid", "z", "k") if not (kind == "resid_mid" and g.parallel))
    out["path_qkv"] = max(
        _diff(*(path_patching(model, task, pairs, "all", ["a1.h1", "a1.h2"], ch, context=c)["metric"].to_numpy()
                for c in (fast, hook)))
        for ch in "qkv")
    try:
        out["pattern"] = _diff(*(activation_patching(model, task, pairs, "pattern", positions=[6], context=c)[
            "metric"].to_numpy() for c in (fast, hook)))
    except DiscardedEditError:
        out["pattern"] = None  # refused: the bridge would discard the edit (the fast backend is exact there)
    return out


def main() -> None:
    families = sys.argv[1:] or list(FAMILIES)
    tokenizer = smollm2_tokenizer()
    print("family     edge_masks  eap (max |eap|)      exact_edges  activation  path_qkv   pattern   seconds")
    worst = 0.0
    with tempfile.TemporaryDirectory() as folder:
        for family in families:
            start = time.perf_counter()
            model = load_model(str(build_tiny(family, os.path.join(folder, family), tokenizer=tokenizer)))
            r = check(model)
            worst = max(worst, *(v for k, v in r.items() if k != "eap_max" and v is not None))
            pattern = "refused" if r["pattern"] is None else f"{r['pattern']:.1e}"
            print(f"{family:10s} {r['edge_masks']:.1e}     {r['eap']:.1e} ({r['eap_max']:.2f})     {r['exact_edges']:.1e}"
                  f"      {r['activation']:.1e}     {r['path_qkv']:.1e}    {pattern:8s}  {time.perf_counter() - start:.1f}",
                  flush=True)
    print(f"max_abs_diff_hook_vs_fast={worst:.2e}")


if __name__ == "__main__":
    main()
