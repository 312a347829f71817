"""Roles of SmolLM2-135M heads on IOI: build a node circuit and label it with measured roles.

Pipeline (CPU, a few minutes on 2 cores):
1. IOI pairs from `tasks` (ABC corruption); activation patching (denoising) of every head output at S2 and
   END and every MLP at END -> node circuit of the top-k |effect| components.
2. Role measurements on the task's own prompts: attention at the IOI positions and direct logit
   attribution (name movers, negative name movers, duplicate/induction/previous-token at S2/S1+1/S1),
   repeated random tokens with OV copying (previous-token, duplicate-token, induction), backup name movers
   (name movers mean-ablated), S-inhibition from path patching into the name movers' queries (senders:
   the heads that attend END->S2 most, below the first name mover).
3. Print the role table (head, role, score, evidence) and the circuit's labelled nodes; write the graph
   (GraphML, MIB JSON, SVG) under --out.

Usage: HF_HUB_OFFLINE=1 .venv/bin/python bench/roles_ioi.py [--n 16] [--top-k 30] [--out runs/roles_ioi]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pandas as pd  # noqa: E402
import torch  # noqa: E402

from circuitlab.graphs.circuit import Selection, circuit_from_node_scores, circuit_table  # noqa: E402
from circuitlab.graphs.draw import draw_circuit  # noqa: E402
from circuitlab.graphs.io import write_graphml, write_mib  # noqa: E402
from circuitlab.graphs.role_scores import IOIPrompts, ioi_head_scores, repeated_random_tokens  # noqa: E402
from circuitlab.graphs.roles import (RoleThresholds, assign_roles, detect_backup_name_movers,  # noqa: E402
                                     detect_ioi_attention_roles, detect_name_movers, detect_repeated_token_roles,
                                     detect_s_inhibition)
from circuitlab.patching.activation import PatchingConfig, activation_patching, prepare  # noqa: E402
from circuitlab.patching.components import head_node  # noqa: E402
from circuitlab.patching.models import load_model  # noqa: E402
from circuitlab.patching.path import path_patching  # noqa: E402
from circuitlab.tasks import get_task  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=16, help="IOI prompt pairs")
    parser.add_argument("--top-k", type=int, default=30, help="components kept in the node circuit")
    parser.add_argument("--s-inhibition-candidates", type=int, default=12)
    parser.add_argument("--out", default="runs/roles_ioi")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    thresholds = RoleThresholds()

    model = load_model("smollm2-135m")
    task = get_task("ioi")
    pairs = task.generate(model, args.n, seed=0)
    prompts = IOIPrompts(pairs.clean_tokens, pairs.positions, pairs.answer_ids, pairs.wrong_ids)
    print(f"model smollm2-135m, {len(pairs)} IOI pairs, e.g. {pairs.clean_texts[0]!r}")

    # 1. node circuit from activation patching
    ctx = prepare(model, task, pairs)
    config = PatchingConfig(direction="denoise", chunk_size=8)
    heads = activation_patching(model, task, pairs, "z", positions=["S2", "END"], config=config, context=ctx)
    mlps = activation_patching(model, task, pairs, "mlp_out", positions=["END"], config=config, context=ctx)
    scores = pd.concat([heads, mlps], ignore_index=True)
    scores["position"] = scores["role"]
    print(f"clean logit diff {ctx.clean_metric:.3f}, corrupt {ctx.corrupt_metric:.3f}; "
          f"patching took {time.time() - t0:.0f}s")
    circuit = circuit_from_node_scores(scores, Selection(top_k=args.top_k), name="smollm2_ioi",
                                       method="activation_patching (denoise, ABC)", n_layers=model.cfg.n_layers)

    # 2. roles from measurements
    ioi = ioi_head_scores(model, prompts)
    movers = detect_name_movers(ioi, thresholds)
    nm = [(int(r.layer), int(r.head)) for r in movers.itertuples() if r.role == "name_mover"]
    backup = detect_backup_name_movers(model, prompts, nm, thresholds, clean_scores=ioi)
    at_positions = detect_ioi_attention_roles(ioi, thresholds)
    vocab_low = 1000  # skip special and byte tokens of the tokenizer
    rep = repeated_random_tokens(model.cfg.d_vocab, 10, 8, seed=0, bos_id=1, low=vocab_low)
    repeated = detect_repeated_token_roles(model, rep, thresholds)
    frames = [movers, backup, at_positions, repeated]
    if nm:
        first = min(layer for layer, _ in nm)
        below = ioi[ioi["layer"] < first].sort_values("attn_end_s2", ascending=False)
        candidates = [head_node(int(r.layer), int(r.head)) for r in below.head(args.s_inhibition_candidates).itertuples()]
        receivers = [head_node(layer, head) for layer, head in nm]
        path = path_patching(model, task, pairs, senders=candidates, receivers=receivers, channel="q",
                             receiver_positions="END", config=PatchingConfig(direction="noise", chunk_size=4),
                             context=ctx)
        path_effects = path[["sender", "receiver", "channel", "effect"]].copy()
        # noising: effect 1 = no change; the path's contribution is how far patching moves it from 1
        path_effects["effect"] = 1.0 - path_effects["effect"]
        frames.append(detect_s_inhibition(path_effects, receivers, thresholds))
    roles = pd.concat([f for f in frames if not f.empty], ignore_index=True)
    labelled = assign_roles(circuit, roles)

    # 3. report
    pd.set_option("display.width", 220)
    pd.set_option("display.max_colwidth", 120)
    pd.set_option("display.max_rows", 200)
    table = roles.assign(head=[head_node(int(a), int(b)) for a, b in zip(roles["layer"], roles["head"])])
    table = table[["head", "role", "score", "threshold", "evidence"]].sort_values(["role", "score"],
                                                                                   ascending=[True, False])
    print(f"\n== detected roles (all heads; thresholds {json.dumps(thresholds.__dict__)}) ==")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    nodes = circuit_table(labelled)
    nodes = nodes[nodes["kind"].isin(["head", "mlp"])]
    print(f"\n== circuit: top-{args.top_k} components by |effect| "
          f"({labelled.number_of_nodes()} nodes, {labelled.number_of_edges()} edges) ==")
    print(nodes[["node", "score", "role", "roles"]].to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    write_graphml(labelled, out / "circuit.graphml")
    write_mib(labelled, out / "circuit_mib.json", n_heads=model.cfg.n_heads, d_model=model.cfg.d_model)
    draw_circuit(labelled, out / "circuit.svg", title="SmolLM2-135M IOI circuit (roles measured)")
    table.to_csv(out / "roles.csv", index=False)
    print(f"\nwrote {out}/circuit.graphml, circuit_mib.json, circuit.svg, roles.csv in {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
