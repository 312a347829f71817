"""Rebuild a ground-truth model's committed files: `python -m graphs.groundtruth.build NAME [NAME ...]|all`.

Writes into `graphs/groundtruth/models/NAME/`: the model (`save_model`: circuitlab-native.json +
model.safetensors), `circuit.json`, `task.json` and `card.md` with accuracies measured here. Hand-wired and
Tracr models rebuild bit-identically (Tracr from the committed export; re-export with `tracr_export.py`).
The planted model retrains (about a minute on one CPU thread; seeded, so identical on the same machine and
torch version, but not guaranteed bit-identical across platforms).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Callable

import torch
from transformer_lens.model_bridge import TransformerBridge

from circuitlab.graphs.groundtruth import verify
from circuitlab.graphs.groundtruth.builders import MODELS_DIR, Built, build_induction_handwired, build_tracr
from circuitlab.graphs.groundtruth.planted import build_planted
from circuitlab.patching.components import head_node, hook_name, parse_edge
from circuitlab.patching.models import save_model
from circuitlab.patching.normalize import noising_share

EVAL_N, EVAL_SEED = 512, 1234


def builders() -> dict[str, Callable[[], Built]]:
    """Name -> zero-argument builder, for every ground-truth model."""
    return {
        "induction_handwired": build_induction_handwired,
        "tracr_reverse": lambda: build_tracr("tracr_reverse"),
        "tracr_frac_prevs": lambda: build_tracr("tracr_frac_prevs"),
        "planted_marker": build_planted,
    }


def zero_head_logits(model: TransformerBridge, tokens: torch.Tensor, layer: int, head: int) -> torch.Tensor:
    """Logits with head (layer, head) zero-ablated at hook_z (all positions)."""
    def fn(z: torch.Tensor, hook: Any) -> torch.Tensor:
        z = z.clone()
        z[:, :, head] = 0.0
        return z

    with torch.no_grad():
        return model.run_with_hooks(tokens, fwd_hooks=[(hook_name("z", layer), fn)])


def resample_head_logits(model: TransformerBridge, tokens: torch.Tensor, source: torch.Tensor, layer: int,
                         head: int) -> torch.Tensor:
    """Logits with head (layer, head)'s z replaced by its z on `source` (resample ablation)."""
    name = hook_name("z", layer)
    with torch.no_grad():
        _, cache = model.run_with_cache(source, names_filter=lambda n: n == name)
    src = cache[name]

    def fn(z: torch.Tensor, hook: Any) -> torch.Tensor:
        z = z.clone()
        z[:, :, head] = src[:, :, head]
        return z

    with torch.no_grad():
        return model.run_with_hooks(tokens, fwd_hooks=[(name, fn)])


def evaluate(built: Built, nodes: set[str], edges: set[str]) -> dict[str, object]:
    """Measurements for the card: accuracy, per-head ablations, circuit-only faithfulness."""
    model, task = built.model, built.task
    batch = task.make_pairs(EVAL_N, seed=EVAL_SEED)
    resample = built.name.startswith("planted")
    with torch.no_grad():
        clean, corrupt = model(batch.clean), model(batch.corrupt)
    read = lambda lg: task.readout(lg, batch)  # noqa: E731
    out: dict[str, Any] = dict(
        n=EVAL_N, seed=EVAL_SEED, accuracy=task.accuracy(clean, batch), corrupt_accuracy=task.accuracy(corrupt, batch),
        metric_clean=float(task.metric(clean, batch)), metric_corrupt=float(task.metric(corrupt, batch)),
        ablation="resample (corrupt input)" if resample else "zero", heads={})
    for layer in range(model.cfg.n_layers):
        for head in range(model.cfg.n_heads):
            lg = (resample_head_logits(model, batch.clean, batch.corrupt, layer, head) if resample
                  else zero_head_logits(model, batch.clean, layer, head))
            out["heads"][head_node(layer, head)] = dict(
                accuracy=task.accuracy(lg, batch), max_abs_delta=float((read(lg) - read(clean)).abs().max()))
    w = verify.weights_of(model)
    src = verify.graph_forward(w, batch.corrupt)[1] if resample else None
    others = set(verify.all_edges(w)) - edges
    lg, _ = verify.graph_forward(w, batch.clean, ablate=others, source=src)
    lg = lg.float()
    out["circuit_only"] = dict(accuracy=task.accuracy(lg, batch), metric=float(task.metric(lg, batch)),
                               max_abs_delta=float((read(lg) - read(clean)).abs().max()))
    out["n_edges_total"] = len(verify.all_edges(w))
    return out


def planted_edges(built: Built, threshold: float = 0.05) -> tuple[set[str], dict[str, float]]:
    """Edges among the planted nodes whose resample ablation moves the metric by > threshold (normalized)."""
    task, w = built.task, verify.weights_of(built.model)
    batch = task.make_pairs(EVAL_N, seed=EVAL_SEED + 1)
    clean_lg, _ = verify.graph_forward(w, batch.clean)
    corrupt_lg, src = verify.graph_forward(w, batch.corrupt)
    m_clean, m_corrupt = float(task.metric(clean_lg, batch)), float(task.metric(corrupt_lg, batch))
    effects = {}
    for edge in verify.all_edges(w):
        s, d, _ = parse_edge(edge)
        if s in built.true_nodes and d in built.true_nodes:
            lg, _ = verify.graph_forward(w, batch.clean, ablate={edge}, source=src)
            effects[edge] = round(noising_share(float(task.metric(lg, batch)), m_clean, m_corrupt), 4)
    return {e for e, v in effects.items() if v > threshold}, effects


def card_text(built: Built, nodes: set[str], edges: set[str], ev: dict[str, object], extra: str = "") -> str:
    heads = "\n".join(f"| {h} | {'circuit' if h in nodes else 'distractor' if h in built.distractors else 'unused (zero weights)'} "
                      f"| {v['accuracy']:.3f} | {v['max_abs_delta']:.3g} |" for h, v in ev["heads"].items())
    cfg = built.model.cfg
    return f"""# {built.name}

**What it computes.** {built.description}

**Architecture.** TL-native, {cfg.n_layers} layers, {cfg.n_heads} heads of d_head {cfg.d_head}, d_model {cfg.d_model},
{'attention only' if cfg.attn_only else f'relu MLPs of {cfg.d_mlp}'}, no layer norm, vocab {cfg.d_vocab} -> {cfg.d_vocab_out},
n_ctx {cfg.n_ctx}, {cfg.attention_dir} attention. No tokenizer: inputs are token ids (`task.json`).

**How it was built.** {built.construction}

Rebuild: `python -m graphs.groundtruth.build {built.name}`.

**Task** (`task.json`, generator `{built.task.generator}`, kind `{built.task.kind}`, seq_len {built.task.seq_len}).
Measured by the build script on {ev['n']} pairs (seed {ev['seed']}): accuracy **{ev['accuracy']:.4f}** (corrupted inputs
scored against the clean answers: {ev['corrupt_accuracy']:.4f}); metric clean {ev['metric_clean']:.4f}, corrupt {ev['metric_corrupt']:.4f}.

**True circuit** (`circuit.json`): {len(nodes)} nodes, {len(edges)} of {ev['n_edges_total']} edges.
- nodes: {', '.join(sorted(nodes))}
- edges: {', '.join(sorted(edges))}

Circuit-only run (every other edge {ev['ablation']}-ablated, our edge-level reference forward
`graphs.groundtruth.verify.graph_forward`): accuracy {ev['circuit_only']['accuracy']:.4f}, metric {ev['circuit_only']['metric']:.4f},
max |change of read logits| {ev['circuit_only']['max_abs_delta']:.3g}.

**Head ablations** ({ev['ablation']} ablation of hook_z at all positions):

| head | role | accuracy | max abs change of read logits |
|---|---|---|---|
{heads}
{extra}"""


def write(built: Built, folder: Path | None = None) -> Path:
    """Derive/measure the circuit and write all committed files of one model."""
    folder = folder or MODELS_DIR / built.name
    w = verify.weights_of(built.model)
    extra = ""
    if built.true_nodes is None:
        nodes, edges = verify.structural_circuit(w)
        batch = built.task.make_pairs(EVAL_N, seed=EVAL_SEED + 1)
        tokens = torch.cat([batch.clean, batch.corrupt])
        edges, dropped = verify.prune_inert_edges(w, tokens, batch.read_pos, edges)
        nodes = {node for e in edges for node in parse_edge(e)[:2]}
        how = ("structural: non-zero virtual weights on a path input -> logits (verify.structural_circuit), "
               "minus edges whose zero-ablation changes no read logit by >= 1e-4 on the task "
               "(verify.prune_inert_edges; listed under inert_structural_edges)")
        built.extra["inert"] = sorted(dropped)
        if dropped:
            extra = ("\n**Inert structural edges** (non-zero weights, but zero-ablating them changes no read logit "
                     "by 1e-4 on the task; not part of the true circuit): " + ", ".join(sorted(dropped)) + "\n")
    else:
        edges, effects = planted_edges(built)
        nodes = set(built.true_nodes)
        how = ("nodes planted by SIIT; edges = edges among them whose resample ablation reduces the "
               "normalized metric by > 0.05 (verify.graph_forward)")
        extra = "\n**Measured edge effects** (normalized metric drop when that edge alone is resample-ablated):\n\n" + \
            "\n".join(f"- `{e}`: {v}" for e, v in sorted(effects.items(), key=lambda kv: -kv[1])) + "\n"
        built.extra["edge_effects"] = effects
    ev = evaluate(built, nodes, edges)
    save_model(built.model, folder)
    circuit = dict(format="circuitlab-circuit", version=1, model=built.name, nodes=sorted(nodes),
                   edges=sorted(edges), distractors=sorted(built.distractors), derivation=how)
    if "inert" in built.extra:
        circuit["inert_structural_edges"] = built.extra["inert"]
    if "edge_effects" in built.extra:
        circuit["edge_effects"] = built.extra["edge_effects"]
    (folder / "circuit.json").write_text(json.dumps(circuit, indent=1) + "\n")
    (folder / "task.json").write_text(json.dumps(built.task.to_json(), indent=1) + "\n")
    (folder / "card.md").write_text(card_text(built, nodes, edges, ev, extra))
    return folder


def main(argv: list[str]) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(1)
    table = builders()
    names = list(table) if (not argv or argv == ["all"]) else argv
    for name in names:
        if name not in table:
            raise SystemExit(f"unknown ground-truth model {name!r}: choose from {sorted(table)} or 'all'")
        print(f"{name}: wrote {write(table[name]())}")


if __name__ == "__main__":
    main(sys.argv[1:])
