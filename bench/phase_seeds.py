"""What holds across seeds in `circuitlab phase`: per-seed numbers and their spread, from each run's summary.json.

Run the defaults once per seed (each pins its torch threads, default 1, so a rerun gives the same numbers):
    circuitlab phase --out runs/phase_s0 --seed 0 --quiet   (likewise --seed 1, --seed 2)
then: `.venv/bin/python bench/phase_seeds.py runs/phase_s0 runs/phase_s1 runs/phase_s2 [--copy bench/results/phase_seeds]`
prints one block per seed (window, ICL scores and ratio, ablation, every acceptance item's pass/fail), then the
spread (min, max, mean ± sd over seeds) and the items that pass in every seed. `--copy` keeps each run's
summary.json and checkpoints.csv (small files) under the given folder as seed<N>.summary.json / seed<N>.checkpoints.csv.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
from pathlib import Path
from typing import Any


def seed_row(folder: Path) -> dict[str, Any]:
    """The numbers of one run that the README reports, read from its summary.json."""
    summary = json.loads((folder / "summary.json").read_text())
    acc = summary["acceptance"]
    icl, win, drop, abl = acc["icl_2L_vs_1L"], acc["window_2L"], acc["icl_drop_in_window_2L"], acc.get("ablation_2L", {})
    heads = acc.get("induction_heads_2L", {})
    return {
        "seed": summary["config"]["seed"], "threads": summary["reproducibility"]["threads"],
        "window_found": win["found"], "window_start": win["start"], "window_end": win["end"],
        "top_induction_before": win["top_induction_before"], "top_induction_after": win["top_induction_after"],
        "icl_1L": icl["icl_1L"], "icl_2L": icl["icl_2L"], "icl_se_1L": icl["icl_se_1L"], "icl_se_2L": icl["icl_se_2L"],
        "ratio": icl["ratio"], "steepest_icl_drop_on_grid": drop["steepest_icl_drop_on_grid"],
        "icl_change_in_window": drop["icl_change_in_window"],
        "induction_heads": [h["head"] for h in heads.get("heads", [])],
        "layer0_previous_token_heads": heads.get("layer0_previous_token_heads", []),
        "ablation_induction_zero": abl.get("fraction_removed_zero"),
        "ablation_induction_mean": abl.get("fraction_removed_mean"),
        "ablation_others_mean_zero": abl.get("others_mean_fraction_removed_zero"),
        "ablation_others_max_zero": abl.get("others_max_fraction_removed_zero"),
        "passes": {name: bool(item.get("pass")) for name, item in acc.items() if isinstance(item, dict)},
        "wall_s": summary["timings_s"]["total"], "cpu_s": summary["cpu_s"],
    }


def _spread(values: list[float | None]) -> str:
    xs = [float(v) for v in values if v is not None]
    if not xs:
        return "n/a"
    sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"min {min(xs):.3f}, max {max(xs):.3f}, mean {statistics.mean(xs):.3f} ± {sd:.3f} (sd, n={len(xs)})"


def report(rows: list[dict[str, Any]]) -> str:
    lines = []
    for r in rows:
        lines.append(f"seed {r['seed']} (threads {r['threads']}): window {r['window_start']}–{r['window_end']} "
                     f"(found {r['window_found']}), top prefix-matching {r['top_induction_before']:.3f} → "
                     f"{r['top_induction_after']:.3f}; final ICL 2L {r['icl_2L']:.3f} ± {r['icl_se_2L']:.3f}, "
                     f"1L {r['icl_1L']:.3f} ± {r['icl_se_1L']:.3f}, ratio {r['ratio']:.2f}; steepest grid drop "
                     f"{r['steepest_icl_drop_on_grid']}; induction heads {r['induction_heads']} (layer-0 previous-token "
                     f"{r['layer0_previous_token_heads']}); ablation removes {r['ablation_induction_zero']} (zero), "
                     f"{r['ablation_induction_mean']} (mean), other heads mean {r['ablation_others_mean_zero']} / max "
                     f"{r['ablation_others_max_zero']}; wall {r['wall_s']:.0f} s, cpu {r['cpu_s']:.0f} s")
        lines.append("  acceptance: " + ", ".join(f"{k} {'pass' if v else 'FAIL'}" for k, v in r["passes"].items()))
    lines.append("spread over seeds:")
    for key in ("ratio", "icl_2L", "icl_1L", "window_start", "window_end", "top_induction_after",
                "ablation_induction_zero", "ablation_induction_mean", "ablation_others_mean_zero"):
        lines.append(f"  {key}: {_spread([r[key] for r in rows])}")
    items = sorted({k for r in rows for k in r["passes"]})
    every = [k for k in items if all(r["passes"].get(k) for r in rows)]
    lines.append(f"acceptance items passing in every seed: {every}")
    lines.append(f"acceptance items failing in some seed: "
                 f"{ {k: [r['seed'] for r in rows if not r['passes'].get(k)] for k in items if k not in every} }")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", help="finished `circuitlab phase` output folders, one per seed")
    parser.add_argument("--copy", default=None, help="keep each run's summary.json and checkpoints.csv here")
    args = parser.parse_args()
    rows = [seed_row(Path(f)) for f in args.folders]
    if args.copy:
        dest = Path(args.copy)
        dest.mkdir(parents=True, exist_ok=True)
        for folder, row in zip(args.folders, rows):
            shutil.copyfile(Path(folder) / "summary.json", dest / f"seed{row['seed']}.summary.json")
            shutil.copyfile(Path(folder) / "checkpoints.csv", dest / f"seed{row['seed']}.checkpoints.csv")
    print(report(rows))


if __name__ == "__main__":
    main()
