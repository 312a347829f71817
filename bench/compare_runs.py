"""Compare the numbers of two `circuitlab run` folders: every CSV and saved table cell and every number in run.json.

Prints the largest absolute difference per table (numbers relative to max(1, |value|)), lists what differs
beyond `--atol` (default 1e-5) and ends with `max_diff=.. differing=..`. Keys that describe the run rather than
its results (timings, wall seconds, threads, versions, platform, resume key, the command, output paths) are
skipped.

Run: `python bench/compare_runs.py RUN_A RUN_B [--atol 1e-5]`.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pandas as pd

SKIP = {"timings", "wall_seconds", "threads", "threads_chosen", "versions", "platform", "resume_key", "command",
        "fresh_because", "outputs", "rendered", "seconds", "resumed_stages", "config_key", "notes", "config"}


def _numbers(value: object, path: str = "") -> dict[str, object]:
    """Flatten JSON into {path: leaf}, skipping run-describing keys."""
    if isinstance(value, dict):
        out: dict[str, object] = {}
        for key, item in value.items():
            if key not in SKIP:
                out.update(_numbers(item, f"{path}.{key}" if path else str(key)))
        return out
    if isinstance(value, list):
        out = {}
        for i, item in enumerate(value):
            out.update(_numbers(item, f"{path}[{i}]"))
        return out
    return {path: value}


def _diff(a: object, b: object) -> float:
    """Scaled absolute difference of two leaves (inf when they disagree in kind or text)."""
    if a is pd.NA or b is pd.NA:  # a missing cell of a nullable column (Int64 positions)
        return 0.0 if a is b else math.inf
    if isinstance(a, bool) or isinstance(b, bool) or not isinstance(a, (int, float)) or not isinstance(b, (int, float)):
        return 0.0 if a == b or (a != a and b != b) else math.inf
    if math.isnan(a) and math.isnan(b):
        return 0.0
    return abs(a - b) / max(1.0, abs(a))


def compare(a: Path, b: Path, atol: float) -> tuple[float, list[str]]:
    worst, bad = 0.0, []
    ja, jb = _numbers(json.loads((a / "run.json").read_text())), _numbers(json.loads((b / "run.json").read_text()))
    for key in sorted(set(ja) | set(jb)):
        d = _diff(ja.get(key), jb.get(key))
        worst = max(worst, d)
        if d > atol:
            bad.append(f"run.json {key}: {ja.get(key)!r} vs {jb.get(key)!r}")
    print(f"run.json: {len(ja)} values")
    for table in sorted(str(p.relative_to(a)) for p in [*a.glob("*.csv"), *a.glob("tables/*.parquet")]):
        read = pd.read_parquet if table.endswith(".parquet") else (lambda f: pd.read_csv(f, low_memory=False))
        fa, fb = read(a / table), read(b / table)
        if fa.shape != fb.shape or list(fa.columns) != list(fb.columns):
            bad.append(f"{table}: shape {fa.shape} vs {fb.shape}")
            continue
        table_worst = 0.0
        for column in fa.columns:
            for i, (x, y) in enumerate(zip(fa[column].tolist(), fb[column].tolist())):
                d = _diff(x, y)
                table_worst = max(table_worst, d)
                if d > atol:
                    bad.append(f"{table} row {i} {column}: {x!r} vs {y!r}")
        worst = max(worst, table_worst)
        print(f"{table}: {fa.shape[0]} rows, max scaled diff {table_worst:.3g}")
    return worst, bad


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("a", type=Path)
    parser.add_argument("b", type=Path)
    parser.add_argument("--atol", type=float, default=1e-5)
    args = parser.parse_args()
    worst, bad = compare(args.a, args.b, args.atol)
    for line in bad[:40]:
        print("DIFF", line)
    print(f"max_diff={worst:.3g} differing={len(bad)}")


if __name__ == "__main__":
    main()
