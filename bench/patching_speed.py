"""Speed of circuitlab's activation patching against transformer_lens.patching, measured in one run, per family.

For each model (SmolLM2-135M, and tiny random-init Hugging Face models of other families built offline with
`tests/hf_tiny.py` at a size where timings mean something: 4 layers, d_model 256, 8 heads, SmolLM2's 49k
vocabulary), on IOI with ABC corruption, it times side by side in this process, one layer at a time and
interleaved (so that bursts of CPU contention hit all engines alike):
1. the head sweep over all positions (what `get_act_patch_attn_head_out_all_pos` computes);
2. the head-by-position sweep (what `get_act_patch_attn_head_out_by_pos` computes) on `--layers` (SmolLM2)
   or `--tiny-layers` (tiny models; the same layers for every engine, so that transformer_lens finishes in minutes);
each through `transformer_lens.patching.generic_activation_patch`, circuitlab's fast runner, and circuitlab's
exact hook backend (`patching/hook_backend.py`, forced). It checks that all give the same numbers and prints
ratios; one machine-readable line per model:
`family=<f> fast_all_pos=<x> fast_by_pos=<x> hook_all_pos=<x> hook_by_pos=<x> max_abs_diff=<x>`
(speed-ups over transformer_lens: > 1 is faster).

Run: `OMP_NUM_THREADS=1 .venv/bin/python bench/patching_speed.py --threads 1 [--n 8] [--families smollm2,gpt2,...]`.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")  # transformer_lens.patching's progress bars

import pandas as pd
import torch
import transformer_lens.patching as tlp

from circuitlab.patching.activation import PatchingConfig, activation_patching, prepare
from circuitlab.patching.hook_backend import HookRunner
from circuitlab.patching.models import load_model
from circuitlab.patching.normalize import normalize
from circuitlab.tasks import get_task

TINY_SIZE = dict(num_hidden_layers=4, hidden_size=256, num_attention_heads=8, intermediate_size=1024, head_dim=32)


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


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def _effects(frame: pd.DataFrame, by_pos: bool) -> torch.Tensor:
    keys = ["position", "head"] if by_pos else ["head"]
    return torch.tensor(frame.sort_values(keys)["effect"].to_numpy())


def _load(family: str, tokenizer: Any, folder: str) -> Any:
    if family == "smollm2":
        return load_model("smollm2-135m")
    from circuitlab.tests.hf_tiny import build_tiny

    return load_model(str(build_tiny(family, os.path.join(folder, family), tokenizer=tokenizer, size=TINY_SIZE)))


def measure(family: str, model: Any, n: int, layers_by_pos: list[int], chunk: int) -> dict[str, Any]:
    """Seconds of each engine on both sweeps, and the largest effect difference against transformer_lens."""
    task = get_task("ioi")
    pairs = task.generate(model, n, seed=0, corruption="abc")
    seq, heads, n_layers = pairs.clean_tokens.shape[1], model.cfg.n_heads, model.cfg.n_layers
    print(f"{family}: {model.cfg.architecture if hasattr(model.cfg, 'architecture') else ''}, IOI ABC, {len(pairs)} "
          f"prompts x {seq} tokens, {n_layers} layers x {heads} heads, d_model {model.cfg.d_model}, "
          f"vocab {model.cfg.d_vocab}", flush=True)
    metric = _tl_metric(model, task, pairs)
    config = PatchingConfig(chunk_size=chunk)
    _, cache = model.run_with_cache(pairs.clean_tokens, names_filter=lambda name: name.endswith("hook_z"))
    fast, t_fast = _timed(lambda: prepare(model, task, pairs))
    hook, t_hook = _timed(lambda: prepare(model, task, pairs, runner=HookRunner(model)))
    assert fast.backend == "fast" and hook.backend == "hook"
    t = {f"{engine}_{sweep}": 0.0 for engine in ("tl", "fast", "hook") for sweep in ("all", "pos")}
    t["fast_all"] = t["fast_pos"] = t_fast
    t["hook_all"] = t["hook_pos"] = t_hook
    diffs = []
    for layer in range(n_layers):
        sweeps = [("all", "all")] + ([("pos", "each")] if layer in layers_by_pos else [])
        for sweep, positions in sweeps:
            by_pos = sweep == "pos"
            ref, dt = _timed(lambda: _tl_sweep(model, pairs, cache, metric, layer, by_pos))
            t[f"tl_{sweep}"] += dt
            for engine, ctx in (("fast", fast), ("hook", hook)):
                ours, dt = _timed(lambda: activation_patching(model, task, pairs, "z", positions=positions,
                                                              layers=[layer], config=config, context=ctx))
                t[f"{engine}_{sweep}"] += dt
                diffs.append(float((_effects(ours, by_pos) - ref.float()).abs().max()))
    result = {"family": family, "patches_all": n_layers * heads, "patches_pos": len(layers_by_pos) * seq * heads,
              "layers_by_pos": layers_by_pos, "max_abs_diff": max(diffs), **t}
    for engine in ("fast", "hook"):
        for sweep in ("all", "pos"):
            result[f"{engine}_{sweep}_speedup"] = t[f"tl_{sweep}"] / t[f"{engine}_{sweep}"]
    return result


def report(r: dict[str, Any]) -> None:
    print(f"  head sweep, all positions ({r['patches_all']} patches): transformer_lens {r['tl_all']:.1f}s, "
          f"fast {r['fast_all']:.1f}s ({r['fast_all_speedup']:.2f}x), hook {r['hook_all']:.1f}s "
          f"({r['hook_all_speedup']:.2f}x)")
    print(f"  head x position, layers {r['layers_by_pos']} ({r['patches_pos']} patches): transformer_lens "
          f"{r['tl_pos']:.1f}s, fast {r['fast_pos']:.1f}s ({r['fast_pos_speedup']:.2f}x), hook {r['hook_pos']:.1f}s "
          f"({r['hook_pos_speedup']:.2f}x)")
    print(f"  max |effect difference| vs transformer_lens: {r['max_abs_diff']:.2e}")
    print(f"family={r['family']} fast_all_pos={r['fast_all_speedup']:.2f} fast_by_pos={r['fast_pos_speedup']:.2f} "
          f"hook_all_pos={r['hook_all_speedup']:.2f} hook_by_pos={r['hook_pos_speedup']:.2f} "
          f"max_abs_diff={r['max_abs_diff']:.2e}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=8, help="IOI prompts (>= 8)")
    parser.add_argument("--families", default="smollm2,gpt2,gpt_neox,qwen2",
                        help="smollm2 and/or families of tests/hf_tiny.py (built at 4 layers, d_model 256)")
    parser.add_argument("--layers", default="0,29", help="SmolLM2 layers for the by-position sweep")
    parser.add_argument("--tiny-layers", default="0,3", help="tiny models' layers for the by-position sweep")
    parser.add_argument("--chunk", type=int, default=8, help="patched copies per forward in circuitlab")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = leave as is)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    print(f"torch threads {torch.get_num_threads()}; speed-ups are transformer_lens seconds / circuitlab seconds")
    tokenizer = None
    results = []
    with tempfile.TemporaryDirectory() as folder:
        for family in args.families.split(","):
            if family != "smollm2" and tokenizer is None:
                from circuitlab.tests.hf_tiny import smollm2_tokenizer

                tokenizer = smollm2_tokenizer()
            model = _load(family, tokenizer, folder)
            layers = [int(x) for x in (args.layers if family == "smollm2" else args.tiny_layers).split(",")]
            results.append(measure(family, model, args.n, layers, args.chunk))
            report(results[-1])
    frame = pd.DataFrame(results)[["family", "fast_all_speedup", "fast_pos_speedup", "hook_all_speedup",
                                   "hook_pos_speedup", "max_abs_diff"]]
    print(frame.to_string(index=False, float_format=lambda x: f"{x:.3g}"))


if __name__ == "__main__":
    main()
