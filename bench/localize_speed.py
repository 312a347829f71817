"""The same interchange sweep through circuitlab and through pyvene 0.1.8, timed side by side in one process.

Sweep: `resid_pre` at every `--layer-step`-th layer × the roles IO and END, a fixed random rotation with
k = `--k` (no training, so both compute the same numbers), on `--n` IOI counterfactual pairs (`io`).
pyvene wraps the Hugging Face model and runs base and source forwards for every site (`block_input`,
`RotatedSpaceIntervention` given our rotation); circuitlab runs base and source once, then one forward per
site that starts at the site's layer and computes only positions from the intervened one. pyvene batches
pairs of one token length together (it has no per-prompt padding); circuitlab batches them all, padded.
The two alternate site by site (interleaved), so load changes hit both. Last line:
`speedup=.. max_abs_diff=..` (pyvene seconds / circuitlab seconds; largest |logit difference| at END).

Usage: .venv/bin/python bench/localize_speed.py [--model smollm2-135m] [--n 16] [--layer-step 3] [--k 16]
"""

from __future__ import annotations

import argparse
import os
import time
from collections import defaultdict

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pyvene as pv  # noqa: E402
import torch  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from circuitlab.patching.engine import make_runner  # noqa: E402
from circuitlab.patching.featurizers import Subspace, random_rotation  # noqa: E402
from circuitlab.patching.interchange import Site, intervened_logits, prepare_batch  # noqa: E402
from circuitlab.patching.models import load_model, smollm2_cache_dir  # noqa: E402
from circuitlab.tasks.causal import causal_model  # noqa: E402


def pyvene_logits(hf, cf, site: Site, rotation: torch.Tensor) -> torch.Tensor:
    """END logits [n, V] of the rotated-subspace interchange at `site`, through pyvene, one length group at a time."""
    k, d = rotation.shape
    extra = torch.randn(d, d - k, generator=torch.Generator().manual_seed(1))
    q, _ = torch.linalg.qr(torch.cat([rotation.T, extra], 1).double())
    q = q.float()
    q[:, :k] = rotation.T
    config = pv.IntervenableConfig(representations=[{"layer": site.layer, "component": "block_input", "unit": "pos",
                                                     "max_number_of_units": 1}],
                                   intervention_types=pv.RotatedSpaceIntervention)
    wrapped = pv.IntervenableModel(config, hf)
    iv = next(iter(wrapped.interventions.values()))
    iv = iv[0] if isinstance(iv, tuple) else iv
    with torch.no_grad():
        iv.rotate_layer.weight = q
    iv.set_interchange_dim(k)
    blen = cf.base_mask.sum(1).tolist() if cf.base_mask is not None else [cf.base_tokens.shape[1]] * len(cf)
    slen = cf.source_mask.sum(1).tolist() if cf.source_mask is not None else [cf.source_tokens.shape[1]] * len(cf)
    groups = defaultdict(list)
    for i in range(len(cf)):
        groups[(int(blen[i]), int(slen[i]))].append(i)
    out = torch.empty(len(cf), hf.config.vocab_size)
    for (lb, ls), rows in groups.items():
        idx = torch.tensor(rows)
        b_pos = cf.base_positions[site.position][idx] if site.position != "last" else cf.base_positions["END"][idx]
        s_pos = cf.source_positions[site.position][idx] if site.position != "last" else cf.source_positions["END"][idx]
        locations = {"sources->base": ([[[int(p)] for p in s_pos]], [[[int(p)] for p in b_pos]])}
        with torch.no_grad():
            _, res = wrapped({"input_ids": cf.base_tokens[idx, :lb]}, [{"input_ids": cf.source_tokens[idx, :ls]}],
                             unit_locations=locations)
        out[idx] = res.logits[:, lb - 1].float()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--n", type=int, default=16)
    parser.add_argument("--layer-step", type=int, default=3)
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    bridge = load_model(args.model)
    folder = smollm2_cache_dir() if args.model == "smollm2-135m" else args.model
    hf = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    runner, backend, _ = make_runner(bridge)
    cf = causal_model("ioi").counterfactuals(bridge, "io", args.n, seed=args.seed)
    sites = [Site("resid_pre", layer, pos) for layer in range(0, runner.n_layers, args.layer_step) for pos in ("IO", "END")]
    rotation = random_rotation(args.k, runner.d_model, generator=torch.Generator().manual_seed(args.seed))
    feat = Subspace(rotation)
    ours_s = theirs_s = 0.0
    start = time.process_time()
    prep = prepare_batch(runner, cf, ["resid_pre"])  # the one base and source run circuitlab needs
    ours_s += time.process_time() - start
    worst = 0.0
    for site in sites:
        start = time.process_time()
        with torch.no_grad():
            ours = intervened_logits(runner, prep, site, feat).float()
        ours_s += time.process_time() - start
        start = time.process_time()
        theirs = pyvene_logits(hf, cf, site, rotation)
        theirs_s += time.process_time() - start
        worst = max(worst, float((ours - theirs).abs().max()))
    print(f"command: python bench/localize_speed.py --model {args.model} --n {args.n} --layer-step {args.layer_step} "
          f"--k {args.k}")
    print(f"{len(sites)} sites x {len(cf)} pairs, rotation k={args.k}; backend {backend}; CPU seconds: circuitlab "
          f"{ours_s:.2f} (incl. its base/source runs), pyvene {theirs_s:.2f}; threads {torch.get_num_threads()}")
    print(f"speedup={theirs_s / max(ours_s, 1e-9):.2f} max_abs_diff={worst:.2e}")


if __name__ == "__main__":
    main()
