"""Real text available offline, and the in-context-learning (ICL) measurements made on it.

The corpus is the Python standard library's own source (`sysconfig.get_paths()["stdlib"]`, every `.py` file
outside `site-packages`, in sorted path order): tens of MB that nobody here wrote, rich in repeated tokens.
Models without a tokenizer read it as bytes (vocabulary 256); models with one read it through their tokenizer.
Files are split into train and held-out sets by a hash of their relative path, so the split never depends on
the order files are found in or on the random seed.

ICL score (Olsson et al. 2022, arXiv 2209.11895): mean loss at a late token index minus mean loss at an early
one, averaged over held-out sequences; negative when the model uses its context. The paper's indices are 500
and 50; contexts shorter than 501 tokens use `late = n_ctx − 1` and `early = round(late / 10)`, the same
10:1 ratio (`icl_positions` says which, and every table records both indices).
"""

from __future__ import annotations

import hashlib
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:  # annotations only: tasks never import or run a model
    from transformers import PreTrainedTokenizerBase
    from transformer_lens.model_bridge import TransformerBridge

PAPER_LATE, PAPER_EARLY = 500, 50
BYTE_VOCAB = 256


@dataclass(frozen=True)
class Corpus:
    """Token streams of a corpus: `train` and `heldout` are 1-D LongTensors; `source` says what was read."""

    train: Tensor
    heldout: Tensor
    vocab: int
    source: str
    n_files: int
    tokenizer: str  # "bytes" or the tokenizer's name

    def batch(self, n: int, seq_len: int, generator: torch.Generator, *, split: str = "train") -> Tensor:
        """`n` windows of `seq_len` tokens starting at random offsets (uniform over the stream), [n, seq_len]."""
        stream = self.train if split == "train" else self.heldout
        if len(stream) <= seq_len:
            raise ValueError(f"the {split} split has {len(stream)} tokens, fewer than one window of {seq_len}; "
                             "use a larger corpus (max_bytes) or a shorter context")
        starts = torch.randint(0, len(stream) - seq_len, (n,), generator=generator)
        return torch.stack([stream[s:s + seq_len] for s in starts.tolist()])


def with_repeats(tokens: Tensor, prob: float, generator: torch.Generator, *, min_len: int = 16,
                 max_len: int = 64) -> Tensor:
    """Copy of `tokens` [n, T] where each row, with probability `prob`, repeats one of its own spans later on.

    The span (length in [min_len, max_len], clipped to fit) starts in the first half of the row at a random
    offset and is written over a random later stretch, so neither where a repeat starts nor how far back its
    source lies is fixed (a layer-0 positional head cannot shortcut it). Text stays real text; only its
    repetition rate rises, which makes induction heads form within a CPU budget (see README).
    """
    if not 0.0 <= prob <= 1.0:
        raise ValueError(f"repeat probability must be in [0, 1], got {prob}")
    out = tokens.clone()
    n, width = out.shape
    max_len = min(max_len, width // 2 - 1)
    if prob == 0.0 or max_len < 2:
        return out
    min_len = min(min_len, max_len)
    draws = torch.rand(n, generator=generator)
    for row in range(n):
        if float(draws[row]) >= prob:
            continue
        length = int(torch.randint(min_len, max_len + 1, (1,), generator=generator))
        src = int(torch.randint(0, width // 2 - length + 1, (1,), generator=generator))
        dst = int(torch.randint(src + length, width - length + 1, (1,), generator=generator))
        out[row, dst:dst + length] = out[row, src:src + length]
    return out


def periodic_mix(corpus: Corpus, n: int, width: int, generator: torch.Generator, *, periodic_prob: float = 0.5,
                 min_period: int = 4, max_period: int = 32, repeat_prob: float = 1.0) -> Tensor:
    """Training batch [n, width] of real text in which a fraction of the rows is "periodic real text".

    Each row is a training window passed through `with_repeats(…, repeat_prob)`; then, with probability
    `periodic_prob`, it keeps a random lead of 0…L−1 of its own tokens and is filled from there on by one
    real-text segment of random length L ∈ [min_period, max_period] (cut from another random window of the
    corpus) tiled to the end. Why: with one repeated span per row a 2-layer attention-only model sits on a
    loss plateau for thousands of steps (no induction head forms within a CPU budget); rows that repeat
    all the way make "attend to the token after the earlier copy" pay on most positions, so induction heads
    form (abruptly, after a plateau) within ~1–2k steps. Every token is still corpus text; every draw comes
    from `generator`.
    """
    if not 0.0 <= periodic_prob <= 1.0:
        raise ValueError(f"periodic_prob must be in [0, 1], got {periodic_prob}")
    if not 1 <= min_period <= max_period < width:
        raise ValueError(f"periods must satisfy 1 ≤ min_period ≤ max_period < width, got {min_period}, "
                         f"{max_period}, width {width}")
    out = with_repeats(corpus.batch(n, width, generator), repeat_prob, generator)
    segments = corpus.batch(n, max_period, generator)
    draws = torch.rand(n, generator=generator)
    periods = torch.randint(min_period, max_period + 1, (n,), generator=generator)
    leads = (torch.rand(n, generator=generator) * periods).long()
    for row in range(n):
        if float(draws[row]) >= periodic_prob:
            continue
        period, lead = int(periods[row]), int(leads[row])
        out[row, lead:] = segments[row, :period].repeat((width - lead) // period + 1)[:width - lead]
    return out


def stdlib_files(root: str | Path | None = None) -> list[Path]:
    """The `.py` files of the Python standard library (no `site-packages`), sorted by path."""
    root = Path(root) if root is not None else Path(sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise FileNotFoundError(f"standard library folder {root} does not exist; pass root= a folder of .py files")
    files = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.relative_to(root).parts
                   and p.is_file())
    if not files:
        raise FileNotFoundError(f"no .py files under {root}")
    return files


def _is_heldout(relative: str, fraction: float) -> bool:
    digest = int(hashlib.sha256(relative.encode()).hexdigest()[:8], 16)
    return digest / 0xFFFFFFFF < fraction


def load_corpus(*, root: str | Path | None = None, max_bytes: int | None = None, heldout_fraction: float = 0.05,
                tokenizer: PreTrainedTokenizerBase | None = None) -> Corpus:
    """Read the standard-library corpus as bytes (default) or through `tokenizer` (any HF tokenizer).

    `max_bytes` caps the text read (files are taken in sorted order until the cap is reached and both splits
    hold a file), which bounds memory and tokenising time for small runs.
    """
    if not 0.0 < heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must be in (0, 1), got {heldout_fraction}")
    base = Path(root) if root is not None else Path(sysconfig.get_paths()["stdlib"])
    files = stdlib_files(base)
    parts: dict[bool, list[bytes]] = {False: [], True: []}
    total = 0
    for path in files:
        data = path.read_bytes()
        parts[_is_heldout(path.relative_to(base).as_posix(), heldout_fraction)].append(data)
        total += len(data)
        if max_bytes is not None and total >= max_bytes and parts[True] and parts[False]:
            break
    if not parts[True] or not parts[False]:
        raise ValueError(f"the corpus under {base} is too small to split (max_bytes={max_bytes}); raise max_bytes")
    n_files = len(parts[True]) + len(parts[False])
    if tokenizer is None:
        def encode(chunks: list[bytes]) -> Tensor:
            joined = b"\n".join(chunks)
            return torch.frombuffer(bytearray(joined), dtype=torch.uint8).long()
        return Corpus(encode(parts[False]), encode(parts[True]), BYTE_VOCAB, str(base), n_files, "bytes")

    def encode_tok(chunks: list[bytes]) -> Tensor:
        ids: list[int] = []
        for chunk in chunks:
            ids.extend(tokenizer(chunk.decode("utf-8", errors="replace"), add_special_tokens=False)["input_ids"])
        return torch.tensor(ids, dtype=torch.long)
    name = str(getattr(tokenizer, "name_or_path", type(tokenizer).__name__))
    return Corpus(encode_tok(parts[False]), encode_tok(parts[True]), len(tokenizer), str(base), n_files, name)


def icl_positions(n_ctx: int) -> tuple[int, int]:
    """(late, early) token indices of the ICL score: (500, 50) when the context allows, else scaled 10:1."""
    if n_ctx < 12:
        raise ValueError(f"an ICL score needs a context of at least 12 tokens, got {n_ctx}")
    if n_ctx > PAPER_LATE:
        return PAPER_LATE, PAPER_EARLY
    late = n_ctx - 1
    return late, max(1, round(late / 10))


def icl_score(losses: Tensor, late: int | None = None, early: int | None = None, width: int = 1) -> float:
    """Loss at token `late` minus loss at token `early` (defaults: `icl_positions(len(losses))`).

    `width` > 1 averages `width` indices on each side (`late−width+1 … late` and `early … early+width−1`) to
    cut the noise of few evaluation sequences; `width=1` is the paper's definition.
    """
    if late is None or early is None:
        late, early = icl_positions(len(losses))
    if not 0 < early < late < len(losses) or width < 1 or early + width - 1 >= late - width + 1:
        raise ValueError(f"ICL indices early={early}, late={late}, width={width} must satisfy "
                         f"0 < early < early+width−1 < late−width+1 ≤ late < {len(losses)}")
    return float(losses[late - width + 1:late + 1].mean() - losses[early:early + width].mean())


def icl_standard_error(per_sequence: Tensor, late: int | None = None, early: int | None = None,
                       width: int = 1) -> float:
    """Standard error of `icl_score` over the sequences, from per-sequence losses [n, seq] (std / √n of each
    sequence's own late-minus-early loss): the evaluation noise to set against an ICL change."""
    if late is None or early is None:
        late, early = icl_positions(per_sequence.shape[1])
    diffs = per_sequence[:, late - width + 1:late + 1].mean(1) - per_sequence[:, early:early + width].mean(1)
    return float(diffs.std() / len(diffs) ** 0.5) if len(diffs) > 1 else float("nan")


def eval_tokens(corpus: Corpus, n: int, seq_len: int, *, seed: int = 0) -> Tensor:
    """A fixed held-out evaluation set: `n` windows of `seq_len` tokens (seeded)."""
    return corpus.batch(n, seq_len, torch.Generator().manual_seed(int(seed)), split="heldout")


def model_corpus(model: TransformerBridge, *, max_bytes: int | None = 2_000_000) -> Corpus:
    """The corpus as `model` reads it: through its tokenizer when it has one, else as bytes."""
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None and model.cfg.d_vocab < BYTE_VOCAB:
        raise ValueError(f"model has no tokenizer and a vocabulary of {model.cfg.d_vocab} < 256: it cannot read "
                         "byte-level text; give it a tokenizer or use a byte-level model")
    return load_corpus(max_bytes=max_bytes, tokenizer=tokenizer)


__all__ = ["Corpus", "PAPER_EARLY", "PAPER_LATE", "eval_tokens", "icl_positions", "icl_score", "icl_standard_error",
           "load_corpus", "model_corpus", "periodic_mix", "stdlib_files", "with_repeats"]
