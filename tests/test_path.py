"""Path patching against a naive freeze-everything-else reference written with explicit bridge hooks."""

import math

import pytest
import torch

from circuitlab.patching.activation import PatchingConfig
from circuitlab.patching.components import hook_name, parse_node
from circuitlab.patching.path import path_patching
from tests.toy import ToyTask, toy_pairs


def naive_path_patch(model, task, pairs, senders, receivers, channel, direction, receiver_pos=None):
    """Wang et al.'s two passes with TransformerLens hooks on the bridge, one prompt set at a time."""
    base_tokens, src_tokens = ((pairs.corrupt_tokens, pairs.clean_tokens) if direction == "denoise"
                               else (pairs.clean_tokens, pairs.corrupt_tokens))
    n_layers = model.cfg.n_layers
    names = [hook_name("z", l) for l in range(n_layers)] + [hook_name("mlp_out", l) for l in range(n_layers)] + \
            [hook_name("resid_pre", l) for l in range(n_layers)]
    with torch.no_grad():
        _, base = model.run_with_cache(base_tokens, names_filter=lambda n: n in names)
        _, src = model.run_with_cache(src_tokens, names_filter=lambda n: n in names)
    sender_nodes = [parse_node(s) for s in senders]
    hooks = []
    for layer in range(n_layers):
        def freeze(act, hook, layer=layer):
            out = base[hook_name("z", layer)].clone()
            for node in sender_nodes:
                if node.kind == "head" and node.layer == layer:
                    out[:, :, node.head] = src[hook_name("z", layer)][:, :, node.head]
            return out
        hooks.append((hook_name("z", layer), freeze))
        if any(n.kind == "mlp" and n.layer == layer for n in sender_nodes):
            hooks.append((hook_name("mlp_out", layer), lambda act, hook, layer=layer: src[hook_name("mlp_out", layer)]))
    recorded = {}
    if channel == "logits":
        hooks.append(("ln_final.hook_in", lambda act, hook: recorded.__setitem__("final", act.clone())))
    else:
        for node in map(parse_node, receivers):
            hooks.append((hook_name("resid_pre", node.layer),
                          lambda act, hook, layer=node.layer: recorded.__setitem__(layer, act.clone())))
    with torch.no_grad():
        model.run_with_hooks(base_tokens, fwd_hooks=hooks)
    rows = torch.arange(base_tokens.shape[0])
    positions = slice(None) if receiver_pos is None else receiver_pos
    if channel == "logits":
        def replace_final(act, hook):
            act = act.clone()
            if receiver_pos is None:
                return recorded["final"]
            act[rows, positions] = recorded["final"][rows, positions]
            return act
        second = [("ln_final.hook_in", replace_final)]
    else:
        second = []
        group = model.cfg.n_heads // (model.cfg.n_key_value_heads or model.cfg.n_heads)
        for node in map(parse_node, receivers):
            W = {"q": model.W_Q, "k": model.W_K, "v": model.W_V}[channel][node.layer]
            try:
                b = {"q": model.b_Q, "k": model.b_K, "v": model.b_V}[channel][node.layer]
            except AttributeError:
                b = torch.zeros(W.shape[0], W.shape[-1])
            head = node.head if channel == "q" else node.head // group
            x = model.blocks[node.layer].ln1(recorded[node.layer])
            alt = x @ W[head] + b[head]

            def replace(act, hook, head=head, alt=alt):
                act = act.clone()
                if receiver_pos is None:
                    act[:, :, head] = alt
                else:
                    act[rows, positions, head] = alt[rows, positions]
                return act
            second.append((hook_name(channel, node.layer), replace))
        if channel in ("k", "v") and group > 1:
            # Per query head: the receiver alone reads the recomputed key/value; its group siblings keep the
            # base one. Replacing the shared head changes nothing below the receiver layer, so the receiver's
            # z from that run is exactly its per-query-head z; splice only that into the base run.
            captured = {}
            for node in map(parse_node, receivers):
                grab = (hook_name("z", node.layer),
                        lambda act, hook, layer=node.layer: captured.setdefault(layer, act.clone()))
                with torch.no_grad():
                    model.run_with_hooks(base_tokens, fwd_hooks=[h for h in second
                                                                 if h[0] == hook_name(channel, node.layer)] + [grab])
                captured.setdefault(("heads", node.layer), []).append(node.head)

            def splice(act, hook):
                layer = int(hook.name.split(".")[1])
                act = act.clone()
                for head in captured.get(("heads", layer), []):
                    act[:, :, head] = captured[layer][:, :, head]
                return act

            second = [(hook_name("z", layer), splice) for layer in {parse_node(r).layer for r in receivers}]
    with torch.no_grad():
        logits = model.run_with_hooks(base_tokens, fwd_hooks=second)
    return task.metric(logits, pairs).mean().item()


@pytest.mark.parametrize("channel,receivers", [("q", ["a2.h1"]), ("k", ["a2.h0", "a2.h3"]), ("v", ["a1.h2"]),
                                               ("logits", None)])
@pytest.mark.parametrize("direction", ["denoise", "noise"])
def test_matches_naive_reference(tiny_model, channel, receivers, direction):
    task, pairs = ToyTask(), toy_pairs(tiny_model.cfg.d_vocab, seed=5)
    frame = path_patching(tiny_model, task, pairs, "all", receivers, channel,
                          config=PatchingConfig(direction=direction, chunk_size=3))
    assert len(frame) > 0
    for row in frame.itertuples():
        expected = naive_path_patch(tiny_model, task, pairs, row.sender.split("+"), receivers, channel, direction)
        assert math.isclose(row.metric, expected, abs_tol=1e-4), row.sender


def test_sender_sets_and_receiver_positions_gqa(tiny_gqa_model):
    task, pairs = ToyTask(), toy_pairs(tiny_gqa_model.cfg.d_vocab, seed=6)
    senders = [["a0.h0", "a0.h3"], "m0", "a0.h1"]
    for channel in ("q", "k"):
        frame = path_patching(tiny_gqa_model, task, pairs, senders, ["a1.h2"], channel, receiver_positions="END")
        assert frame["sender"].tolist() == ["a0.h0+a0.h3", "m0", "a0.h1"]
        for row in frame.itertuples():
            expected = naive_path_patch(tiny_gqa_model, task, pairs, row.sender.split("+"), ["a1.h2"], channel,
                                        "denoise", receiver_pos=pairs.positions["END"])
            assert math.isclose(row.metric, expected, abs_tol=1e-4), (channel, row.sender)


def test_path_patching_bad_input(tiny_model):
    task, pairs = ToyTask(), toy_pairs(tiny_model.cfg.d_vocab)
    with pytest.raises(ValueError, match="channel 'z'"):
        path_patching(tiny_model, task, pairs, "heads", ["a2.h0"], "z")
    with pytest.raises(ValueError, match="unknown node name 'head7'"):
        path_patching(tiny_model, task, pairs, ["head7"], ["a2.h0"], "q")
    with pytest.raises(ValueError, match="not in this model"):
        path_patching(tiny_model, task, pairs, ["a9.h0"], ["a2.h0"], "q")
    with pytest.raises(ValueError, match="no sender lies below"):
        path_patching(tiny_model, task, pairs, ["a2.h1"], ["a1.h0"], "q")
    with pytest.raises(ValueError, match="needs receiver heads"):
        path_patching(tiny_model, task, pairs, "heads", None, "q")
