"""Methods benchmark: activation patching, EAP, EAP-IG, ACDC and a random baseline on every ground-truth model
and on SmolLM2 IOI; writes bench/results/methods.md (+ .csv, .png). Same as `circuitlab bench methods`.

Usage: HF_HUB_OFFLINE=1 .venv/bin/python bench/methods.py [--models a,b] [--methods eap,acdc] [--n 32]
       [--ioi-n 8] [--seed 0] [--out bench/results]
       [--own-model DIR --own-circuit circuit.json --own-task task.json|ioi]
The library code is `graphs.benchmark`; argument handling and output files are `reports.bench`.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from circuitlab.reports.bench import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
