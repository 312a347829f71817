"""What a `circuitlab run` may reuse: the resume key and the stage cache it opens.

The key hashes four parts: the resolved config (`RunConfig.result_key`, every option that changes results),
the model's weight hash (from the loaded weights, so a model re-saved at the same path does not match), the
task's prompt pairs (hashed as generated, so changed task code, data files or tokenizers do not match) and
circuitlab's code version. Saved stages under another key are discarded, and the run says which part differs.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
import time
from pathlib import Path
from transformer_lens.model_bridge import TransformerBridge
from typing import Callable

from circuitlab.patching.batched import bytes_per_prompt
from circuitlab.patching.models import weight_hash
from circuitlab.reports import rundir, store
from circuitlab.reports.config import RunConfig
from circuitlab.reports.pipeline import Pipeline
from circuitlab.reports.prompts import RunPrompts, split_prompts
from circuitlab.reports.save import StageCache
from circuitlab.tasks.base import PromptPairs


def generate_pairs(p: Pipeline) -> RunPrompts:
    """The run's discovery, held-out (and --validation-n's validation) prompt pairs and how they were split
    (`reports.prompts.split_prompts`),
    after checking that `--n` fits the memory budget and the free memory (one pair
    is generated first to learn the prompt length; nothing of size n is allocated before the check)."""
    cfg, model = p.cfg, p.model()
    options = dict(cfg.task_options, **({"corruption": cfg.corruption} if cfg.corruption is not None else {}))
    sample = p.task.generate(model, 1, seed=cfg.seed, **options)

    batch = bytes_per_prompt(model, sample.seq_len)
    if cfg.method == "acdc":  # ACDC keeps every batch's context alive
        held, what = batch, "the activations ACDC keeps for every prompt batch"
    else:  # prompt batches keep memory flat; what grows with n is the pairs themselves (Python objects, ~4x JSONL)
        held, what = 4.0 * len(pairs_jsonl(sample)) + 16.0 * sample.seq_len, "the prompt pairs"
    rundir.check_n(cfg.n, held, batch if cfg.batch_size is None else 0.0, cfg.memory_budget, what)

    n_heldout = cfg.heldout_n or cfg.n
    p.say(f"[pairs] generating {cfg.n} prompt pairs" + (f", {cfg.validation_n} validation pairs"
                                                        if cfg.validation_n is not None else "")
          + f" and {n_heldout} held-out pairs ...")
    start = time.time()
    prompts = split_prompts(p.task, model, cfg.n, n_heldout, cfg.seed, options, cfg.validation_n)
    parts = [prompts.discovery, prompts.heldout] + ([prompts.validation] if prompts.validation is not None else [])
    rundir.check_context(max(part.seq_len for part in parts), model, cfg.model)
    p.result.timings["generate"] = round(time.time() - start, 3)
    return prompts


def pairs_jsonl(pairs: PromptPairs) -> bytes:
    """The pairs as saved to JSONL."""
    with tempfile.TemporaryDirectory() as tmp:
        pairs.save_jsonl(Path(tmp) / "pairs.jsonl")
        return (Path(tmp) / "pairs.jsonl").read_bytes()


def pairs_hash(pairs: PromptPairs) -> str:
    """SHA-256 (16 hex digits) of the pairs as saved to JSONL."""
    return hashlib.sha256(pairs_jsonl(pairs)).hexdigest()[:16]


def key_parts(cfg: RunConfig, model: TransformerBridge, pairs: PromptPairs,
              heldout: PromptPairs | None = None, validation: PromptPairs | None = None) -> dict[str, str]:
    """The four parts of the resume key (the task part hashes the discovery, held-out and validation pairs)."""
    extra = b"" if validation is None else b"\n--validation--\n" + pairs_jsonl(validation)
    task = pairs_hash(pairs) if heldout is None and validation is None else hashlib.sha256(
        pairs_jsonl(pairs) + (b"" if heldout is None else b"\n--heldout--\n" + pairs_jsonl(heldout))
        + extra).hexdigest()[:16]
    return {"config": cfg.result_key(), "model": weight_hash(model), "task": task, "code": store.code_version()}


def open_cache(out: Path, parts: dict[str, str], say: Callable[[str], None]) -> tuple[StageCache, list[str]]:
    """The stage cache for this key in the staging folder of `out`: saved stages of a failed run with the same
    key (kept in the staging folder), else those of the finished result in `out`; anything else is discarded.
    Returns the cache and why older saved work was not reused."""
    key = store.resume_key(parts)
    staging = rundir.staging_path(out)
    reasons: list[str] = []
    if not (staging / store.PARTIAL / key).is_dir() and not (out / store.PARTIAL / key).is_dir():
        reasons = (store.describe_stale(staging / store.PARTIAL, parts)
                   + store.describe_stale(out / store.PARTIAL, parts))
        if reasons:
            say(f"starting fresh: {'; '.join(reasons)}")
    staging = rundir.fresh_staging(out, keep=key)
    if not (staging / store.PARTIAL / key).is_dir() and (out / store.PARTIAL / key).is_dir():
        shutil.copytree(out / store.PARTIAL / key, staging / store.PARTIAL / key)
    cache = StageCache(staging, key)
    store.write_json(cache.root / store.KEY_FILE, parts)
    return cache, reasons


__all__ = ["generate_pairs", "key_parts", "open_cache", "pairs_hash"]
