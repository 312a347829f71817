"""Speed of circuitlab's activation patching against transformer_lens.patching, measured in one run.

On SmolLM2-135M IOI (ABC corruption) it times, side by side in this process:
1. the head sweep over all positions (what `get_act_patch_attn_head_out_all_pos` computes);
2. the head-by-position sweep (what `get_act_patch_attn_head_out_by_pos` computes), restricted to a few
   layers so that TransformerLens finishes in minutes (the same layers for both);
both through `transformer_lens.patching.generic_activation_patch`, one layer at a time, interleaved with ours;
3. the lower bound: the summed cost of one plain forward per patch from the patched layer over the positions
   at and after the patched one, unembedding only the read positions (no patching overhead, batch = prompts).
It checks that both engines give the same numbers and prints ratios. The last line is machine-readable:
`speedup_all_pos=<x> speedup_by_pos=<x> max_abs_diff=<x>`.

Run: `.venv/bin/python bench/patching_speed.py [--n 8] [--layers 0,15,29] [--repeats 1]`.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pandas as pd
import torch
import transformer_lens.patching as tlp

from circuitlab.patching.activation import PatchingConfig, activation_patching, prepare
from circuitlab.patching.models import load_model
from circuitlab.patching.normalize import normalize
from circuitlab.tasks import get_task


def _tl_metric(model, task, pairs):
    with torch.no_grad():
        clean = task.metric(model(pairs.clean_tokens), pairs).mean()
        corrupt = task.metric(model(pairs.corrupt_tokens), pairs).mean()
    return lambda logits: normalize(task.metric(logits, pairs).mean(), clean, corrupt)


def _tl_sweep(model, pairs, cache, metric, layer, by_pos):
    """transformer_lens.patching's head sweep (all positions or by position) restricted to one layer."""
    seq, heads = pairs.clean_tokens.shape[1], model.cfg.n_heads
    if by_pos:
        index = pd.DataFrame([(layer, p, h) for p in range(seq) for h in range(heads)],
                             columns=["layer", "pos", "head_index"])
        setter = tlp.layer_pos_head_vector_patch_setter
    else:
        index = pd.DataFrame([(layer, h) for h in range(heads)], columns=["layer", "head_index"])
        setter = tlp.layer_head_vector_patch_setter
    values = tlp.generic_activation_patch(model, pairs.corrupt_tokens, cache, metric, setter, "z", index_df=index)
    return torch.as_tensor(values).view(-1)


def _lower_bound(ctx, layer: int, positions: list[int], patches_per_position: int) -> float:
    """Seconds for one plain forward per patch from its layer and position, read positions only."""
    runner, base = ctx.runner, ctx.corrupt
    total = 0.0
    for pos0 in positions:
        start = time.perf_counter()
        resid = runner.run(base.resid_pre[layer][:, pos0:], start_layer=layer, pos0=pos0, past=base.kv)
        idx = (ctx.read_positions - pos0).clamp(min=0)
        runner.unembed(torch.gather(resid, 1, idx[..., None].expand(-1, -1, resid.shape[-1])))
        total += (time.perf_counter() - start) * patches_per_position
    return total


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=8, help="IOI prompts (>= 8)")
    parser.add_argument("--layers", default="0,10,20,29", help="layers for the by-position comparison")
    parser.add_argument("--chunk", type=int, default=8, help="patched copies per forward in circuitlab")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = leave as is)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    model = load_model("smollm2-135m")
    task = get_task("ioi")
    pairs = task.generate(model, args.n, seed=0, corruption="abc")
    layers = [int(x) for x in args.layers.split(",")]
    print(f"model smollm2-135m, IOI ABC, {len(pairs)} prompts x {pairs.clean_tokens.shape[1]} tokens, "
          f"{model.cfg.n_layers} layers x {model.cfg.n_heads} heads, torch threads {torch.get_num_threads()}")
    metric = _tl_metric(model, task, pairs)
    config = PatchingConfig(chunk_size=args.chunk)
    _, cache = model.run_with_cache(pairs.clean_tokens, names_filter=lambda n: n.endswith("hook_z"))

    # Interleaved layer by layer (ours, TransformerLens, lower bound) so that CPU contention, which comes in
    # bursts on these machines, hits all three alike.
    ctx, t_prepare = _timed(lambda: prepare(model, task, pairs))
    seq, heads = pairs.clean_tokens.shape[1], model.cfg.n_heads
    totals = {key: 0.0 for key in ("ours_all", "tl_all", "lb_all", "ours_pos", "tl_pos", "lb_pos")}
    totals["ours_all"] = totals["ours_pos"] = t_prepare
    diffs = []
    for layer in range(model.cfg.n_layers):
        ours, t = _timed(lambda: activation_patching(model, task, pairs, "z", positions="all", layers=[layer],
                                                     config=config, context=ctx))
        totals["ours_all"] += t
        ref, t = _timed(lambda: _tl_sweep(model, pairs, cache, metric, layer, by_pos=False))
        totals["tl_all"] += t
        totals["lb_all"] += _lower_bound(ctx, layer, [0], heads)
        diffs.append((torch.tensor(ours.sort_values("head")["effect"].to_numpy()) - ref.float()).abs().max().item())
        if layer not in layers:
            continue
        ours, t = _timed(lambda: activation_patching(model, task, pairs, "z", positions="each", layers=[layer],
                                                     config=config, context=ctx))
        totals["ours_pos"] += t
        ref, t = _timed(lambda: _tl_sweep(model, pairs, cache, metric, layer, by_pos=True))
        totals["tl_pos"] += t
        totals["lb_pos"] += _lower_bound(ctx, layer, list(range(seq)), heads)
        grid = torch.tensor(ours.sort_values(["position", "head"])["effect"].to_numpy())
        diffs.append((grid - ref.float()).abs().max().item())
    t_ours_all, t_tl_all, t_lb_all = totals["ours_all"], totals["tl_all"], totals["lb_all"]
    t_ours_pos, t_tl_pos, t_lb_pos = totals["ours_pos"], totals["tl_pos"], totals["lb_pos"]
    diff_all = diff_pos = max(diffs)

    print(f"head sweep, all positions ({model.cfg.n_layers * model.cfg.n_heads} patches): "
          f"transformer_lens {t_tl_all:.1f}s, circuitlab {t_ours_all:.1f}s, lower bound {t_lb_all:.1f}s")
    print(f"head x position sweep, layers {layers} ({len(layers) * seq * model.cfg.n_heads} patches): "
          f"transformer_lens {t_tl_pos:.1f}s, circuitlab {t_ours_pos:.1f}s, lower bound {t_lb_pos:.1f}s")
    print(f"circuitlab / lower bound: all positions {t_ours_all / t_lb_all:.2f}x, by position {t_ours_pos / t_lb_pos:.2f}x")
    print(f"max |effect difference| vs transformer_lens: {diff_all:.2e}")
    print(f"speedup_all_pos={t_tl_all / t_ours_all:.2f} speedup_by_pos={t_tl_pos / t_ours_pos:.2f} "
          f"max_abs_diff={max(diff_all, diff_pos):.2e}")


if __name__ == "__main__":
    main()
