"""Compile RASP programs with Tracr and export their weights as plain numpy (run ONLY in a Tracr venv).

Why a separate step: Tracr needs JAX, which circuitlab does not depend on. This script runs in a throwaway
virtualenv (`python3.11 -m venv /tmp/tracr-venv && /tmp/tracr-venv/bin/pip install tracr-pypi==1.0.0`)
and writes, per program, `tracr_export.npz` (weights, residual labels, reference outputs) plus
`tracr_export.json` (vocabulary, encodings, shapes) into `graphs/groundtruth/models/<name>/`. The conversion
to a TransformerLens-4 native model (`graphs.groundtruth.builders.build_tracr`) reads only those files, so
`python -m graphs.groundtruth.build tracr_reverse` works without JAX.

    /tmp/tracr-venv/bin/python graphs/groundtruth/tracr_export.py [NAME ...]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
BOS = "BOS"


def _programs() -> dict[str, dict[str, Any]]:
    from tracr.compiler import lib  # optional dependency: tracr (only to rebuild the tracr ground truths)
    from tracr.rasp import rasp  # optional dependency: tracr (only to rebuild the tracr ground truths)

    return {
        "tracr_reverse": dict(program=lib.make_reverse(rasp.tokens), vocab=["a", "b", "c", "d"],
                              max_seq_len=5, causal=False, categorical=True,
                              description="reverse: output[i] = tokens[n-1-i] (uses length = SelectorWidth)"),
        "tracr_frac_prevs": dict(program=lib.make_frac_prevs(rasp.tokens == "x"), vocab=["a", "b", "x"],
                                 max_seq_len=6, causal=True, categorical=False,
                                 description="frac_prevs: output[i] = fraction of tokens[0..i] equal to 'x'"),
    }


def export(name: str, spec: dict[str, object], out_dir: Path, n_ref: int = 32, seed: int = 0) -> None:
    """Compile one program and write its weights, labels and reference outputs."""
    from tracr.compiler import compiling  # optional dependency: tracr (only to rebuild the tracr ground truths)

    model = compiling.compile_rasp_to_model(spec["program"], vocab=set(spec["vocab"]),
                                            max_seq_len=spec["max_seq_len"], causal=spec["causal"],
                                            compiler_bos=BOS)
    cfg = model.model_config
    assert not cfg.layer_norm, "Tracr models are compiled without layer norm"
    arrays: dict[str, np.ndarray] = {}
    for module, params in model.params.items():
        for key, value in params.items():
            arrays[f"{module}/{key}"] = np.asarray(value, dtype=np.float64)
    in_enc = model.input_encoder.encoding_map
    out_enc = getattr(model.output_encoder, "encoding_map", None)  # None for numerical outputs
    # Reference outputs: the final residual stream for fixed inputs, to check the conversion exactly.
    rng = np.random.default_rng(seed)
    inputs = []
    for _ in range(n_ref):
        length = spec["max_seq_len"]  # full length: the task spec uses fixed-length batches
        inputs.append([BOS] + [spec["vocab"][int(i)] for i in rng.integers(0, len(spec["vocab"]), length)])
    ref_ids, ref_resid, ref_decoded = [], [], []
    for toks in inputs:
        out = model.apply(toks)
        ref_ids.append([in_enc[t] for t in toks])
        ref_resid.append(np.asarray(out.transformer_output[0], dtype=np.float64))
        ref_decoded.append([str(x) for x in out.decoded])
    arrays["ref_tokens"] = np.asarray(ref_ids, dtype=np.int64)
    arrays["ref_final_resid"] = np.stack(ref_resid)
    meta = dict(
        name=name, description=spec["description"], vocab=spec["vocab"], bos=BOS,
        max_seq_len=spec["max_seq_len"], causal=spec["causal"], categorical=spec["categorical"],
        num_layers=cfg.num_layers, num_heads=cfg.num_heads, key_size=cfg.key_size,
        mlp_hidden_size=cfg.mlp_hidden_size, activation="relu",
        residual_labels=[str(x) for x in model.residual_labels],
        input_encoding={str(k): int(v) for k, v in in_enc.items()},
        output_encoding=None if out_enc is None else {str(k): int(v) for k, v in out_enc.items()},
        output_name=spec["program"].label, ref_decoded=ref_decoded,
        tracr_version="tracr-pypi 1.0.0",
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out_dir / "tracr_export.npz", **arrays)
    (out_dir / "tracr_export.json").write_text(json.dumps(meta, indent=1))
    print(f"{name}: {cfg.num_layers} layers, {cfg.num_heads} heads, d_model {len(model.residual_labels)}, "
          f"mlp {cfg.mlp_hidden_size} -> {out_dir}")


def main(argv: list[str]) -> None:
    progs = _programs()
    names = argv or list(progs)
    for name in names:
        if name not in progs:
            raise SystemExit(f"unknown Tracr program {name!r}: choose from {sorted(progs)}")
        export(name, progs[name], HERE / "models" / name)


if __name__ == "__main__":
    main(sys.argv[1:])
