"""Causal-variable ground truth: does each featurizer find a variable planted in a known rotated subspace?

The hand-wired model of `graphs.groundtruth.subspace` holds variable X at `resid_pre` layer 0 at the content
position in exactly k = 2 rotated dimensions (a nuisance of larger variance beside it); the filler and END
positions carry nothing of X. This sweeps the true site and the wrong ones with every featurizer (trained ones
on the train pairs, at the site with the best full-vector train IIA) and prints the held-out IIA table with
its controls, then one summary line:
`das_iia=.. neurons_iia=.. pca_iia=.. random_iia=.. wrong_sites_max_iia=.. baseline_iia=..` (random: the
random-rotation control with the true k).

Usage: .venv/bin/python bench/localize_groundtruth.py [--n 128] [--steps 100] [--seed 0]
"""

from __future__ import annotations

import argparse

from circuitlab.graphs.groundtruth.subspace import build_subspace_model
from circuitlab.patching.localize import LocalizeConfig, localize


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=128)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    gt = build_subspace_model(seed=args.seed)
    config = LocalizeConfig(featurizers=("full", "neurons", "pca", "das", "boundless", "mask"), dims=(gt.k,),
                            steps=args.steps, lr=0.05, top_sites=1, seed=args.seed)
    result = localize(gt.model, gt.counterfactuals(args.n, seed=args.seed), sites=[gt.true_site] + gt.wrong_sites,
                      config=config)
    frame = result.to_frame()
    test = frame[frame.split == "test"]
    print(f"command: python bench/localize_groundtruth.py --n {args.n} --steps {args.steps} --seed {args.seed}")
    print(f"pairs: {len(result.counterfactuals)} ({result.counterfactuals.split.count('test')} held out); true site "
          f"{gt.true_site.label}, k = {gt.k}")
    print(test[["component", "layer", "position", "featurizer", "dims", "iia", "iia_low", "iia_high", "graded"]]
          .to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    at_true = test[(test.position == str(gt.true_site.position)) & (test.component == gt.true_site.component)]

    def get(name: str) -> float:
        rows = at_true[at_true.featurizer == name]
        return float(rows[rows.dims == gt.k].iia.max() if name == "random" else rows.iia.max())

    wrong = test[(test.position != str(gt.true_site.position)) & (test.featurizer != "none")]
    print(f"das_iia={get('das'):.3f} neurons_iia={get('neurons'):.3f} pca_iia={get('pca'):.3f} "
          f"random_iia={get('random'):.3f} wrong_sites_max_iia={float(wrong.iia.max()):.3f} "
          f"baseline_iia={float(test[test.featurizer == 'none'].iia.iloc[0]):.3f}")


if __name__ == "__main__":
    main()
