"""Exact node patching as a method: noise every head output (`z`) and MLP output in turn; a node's score is
m(clean) − m(node corrupted) (`patching.activation`), over every prompt."""

from circuitlab.patching.activation import PatchingConfig
from circuitlab.patching.components import head_node, mlp_node
from circuitlab.patching.methods.registry import Method, MethodOptions, MethodScores, register
from circuitlab.patching.prompts import Prompts


def score(prompts: Prompts, options: MethodOptions) -> MethodScores:
    config = PatchingConfig(direction="noise", source=options.ablation, memory_budget_mb=options.memory_budget_mb,
                            progress=options.progress)
    clean = float(prompts.baseline()[0].double().mean())
    graph = prompts.graph
    values: dict[str, float] = {}
    for kind in ["z"] + ([] if graph.attn_only else ["mlp_out"]):
        frame = prompts.activation_patching(kind, config=config)
        for layer, head, metric in zip(frame["layer"], frame["head"], frame["metric"].to_numpy(float)):
            values[head_node(int(layer), int(head)) if kind == "z" else mlp_node(int(layer))] = clean - float(metric)
    return MethodScores(nodes={name: values[name] for name in graph.sender_names if name in values})


ACTIVATION = register(Method("activation", "node", True, "exact node patching (noising) of every head z and MLP out; "
                             "edge score = min(|s_u|, |s_v|)", score, circuit="single-effect",
                             leaderboard_order=9))
