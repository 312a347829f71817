"""Tokenizer plumbing shared by the tasks: resolving a model or tokenizer, BOS handling, single-token
filtering, and rendering templates into token ids with the exact token span of every slot.

BOS convention: with a TransformerBridge we prepend `tokenizer.bos_token_id` when the bridge's
`cfg.default_prepend_bos` is true (as `model.to_tokens` does); with a bare Hugging Face tokenizer we prepend
its `bos_token_id` when it has one. `prepend_bos=` overrides both. A bridge without a tokenizer (tiny native
models) gets no BOS unless a `bos_id` is given.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections import Counter
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence, TYPE_CHECKING, TypeVar, Union

if TYPE_CHECKING:  # annotations only: tasks never import or run a model
    from transformers import PreTrainedTokenizerBase
    from transformer_lens.model_bridge import TransformerBridge

log = logging.getLogger("circuitlab.tasks")

ModelOrTokenizer = Union["TransformerBridge", "PreTrainedTokenizerBase"]  # what a task reads its tokens from
_SLOT = re.compile(r"( ?)\{(\w+)\}")
T = TypeVar("T")


@dataclass(frozen=True)
class TokenSource:
    """What a task needs from a model or tokenizer: the tokenizer (may be None), the model (may be None),
    the BOS id to prepend (None = no BOS) and the vocabulary size."""

    tokenizer: PreTrainedTokenizerBase | None
    model: TransformerBridge | None
    bos_id: int | None
    d_vocab: int

    @property
    def n_prefix(self) -> int:
        """How many tokens come before the text (1 with BOS, else 0)."""
        return 0 if self.bos_id is None else 1

    def require_tokenizer(self, task: str) -> PreTrainedTokenizerBase:
        if self.tokenizer is None:
            raise ValueError(f"task {task!r} needs a tokenizer, but the model has none (model.tokenizer is None). "
                             "Pass a Hugging Face tokenizer or a model booted with one.")
        return self.tokenizer

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` without special tokens (no BOS)."""
        if text == "":
            return []
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def with_bos(self, ids: Sequence[int]) -> list[int]:
        return ([] if self.bos_id is None else [self.bos_id]) + list(ids)

    def single_token(self, text: str) -> int | None:
        """The id of `text` if it is exactly one token, else None."""
        ids = self.encode(text)
        return ids[0] if len(ids) == 1 else None

    def decode(self, ids: Sequence[int]) -> str:
        if self.tokenizer is None:
            return " ".join(f"<{i}>" for i in ids)
        return self.tokenizer.decode(list(ids))


def is_bridge(obj: object) -> bool:
    """True for a TransformerBridge-like model (has `cfg` and a `tokenizer` attribute)."""
    return hasattr(obj, "cfg") and hasattr(obj, "tokenizer")


def resolve(model_or_tokenizer: ModelOrTokenizer, *, prepend_bos: bool | None = None,
            bos_id: int | None = None) -> TokenSource:
    """Turn a TransformerBridge or a Hugging Face tokenizer into a `TokenSource` (see the module docstring)."""
    if model_or_tokenizer is None:
        raise ValueError("need a model (TransformerBridge) or a Hugging Face tokenizer, got None")
    if is_bridge(model_or_tokenizer):
        model = model_or_tokenizer
        tok = model.tokenizer
        d_vocab = int(model.cfg.d_vocab)
        default_bos = bool(getattr(model.cfg, "default_prepend_bos", True))
    elif callable(model_or_tokenizer) and hasattr(model_or_tokenizer, "decode"):
        model, tok = None, model_or_tokenizer
        d_vocab = len(tok)
        default_bos = True
    else:
        raise TypeError(f"expected a TransformerBridge or a Hugging Face tokenizer, got {type(model_or_tokenizer).__name__}")
    use_bos = default_bos if prepend_bos is None else bool(prepend_bos)
    chosen: int | None = None
    if bos_id is not None:
        chosen = int(bos_id) if (prepend_bos is None or prepend_bos) else None
    elif use_bos and tok is not None and getattr(tok, "bos_token_id", None) is not None:
        chosen = int(tok.bos_token_id)
    elif prepend_bos and tok is None:
        raise ValueError("prepend_bos=True but the model has no tokenizer to take a BOS id from: pass bos_id=...")
    if chosen is not None and not 0 <= chosen < d_vocab:
        raise ValueError(f"bos_id {chosen} is outside the vocabulary (size {d_vocab})")
    return TokenSource(tokenizer=tok, model=model, bos_id=chosen, d_vocab=d_vocab)


def filter_single_tokens(words: Iterable[str], src: TokenSource, *, what: str, minimum: int = 1,
                         leading_space: bool = True) -> dict[str, int]:
    """Keep the words that are one token (with a leading space by default): {word: id}, in input order.

    Logs how many were dropped; raises ValueError naming the pool when fewer than `minimum` remain.
    """
    kept: dict[str, int] = {}
    dropped: list[str] = []
    for word in dict.fromkeys(words):
        tid = src.single_token((" " if leading_space else "") + word)
        (dropped.append(word) if tid is None else kept.__setitem__(word, tid))
    if dropped:
        log.info("%s: kept %d of %d candidates that are single tokens; dropped %s", what, len(kept),
                 len(kept) + len(dropped), dropped[:10])
    if len(kept) < minimum:
        raise ValueError(f"only {len(kept)} {what} are single tokens for this tokenizer (need at least {minimum}); "
                         f"dropped: {dropped[:20]}. Pass your own list of one-token {what}.")
    return kept


@dataclass(frozen=True)
class Rendered:
    """A template filled in: its text, token ids (BOS included) and the token span [start, end) of each slot."""

    text: str
    ids: list[int]
    spans: dict[str, tuple[int, int]]


def template_slots(template: str) -> list[str]:
    """Slot names of a template in order (`{IO}`, `{S1}`, …)."""
    return [m.group(2) for m in _SLOT.finditer(template)]


def render(template: str, values: Mapping[str, str], src: TokenSource) -> Rendered:
    """Fill `template` and find the token span of every slot.

    A slot preceded by a space (`" {IO}"`) takes the space into its span, as BPE tokenizers glue the space to
    the following word. Each span is verified: the tokens of the text before the slot (and up to its end)
    must be a prefix of the tokens of the whole text, otherwise the slot merged with its neighbours and a
    ValueError names the text.
    """
    pieces: list[str] = []
    char_spans: dict[str, tuple[int, int]] = {}
    pos, cursor = 0, 0
    for match in _SLOT.finditer(template):
        literal = template[cursor:match.start()]
        pieces.append(literal)
        pos += len(literal)
        name = match.group(2)
        if name not in values:
            raise KeyError(f"template {template!r} needs a value for slot {{{name}}}")
        if name in char_spans:
            raise ValueError(f"slot {{{name}}} appears twice in {template!r}: name each occurrence (S1, S2)")
        value = match.group(1) + values[name]
        pieces.append(value)
        char_spans[name] = (pos, pos + len(value))
        pos += len(value)
        cursor = match.end()
    pieces.append(template[cursor:])
    text = "".join(pieces)
    ids = src.encode(text)
    spans: dict[str, tuple[int, int]] = {}
    for name, (start, end) in char_spans.items():
        before, upto = src.encode(text[:start]), src.encode(text[:end])
        if ids[:len(before)] != before or ids[:len(upto)] != upto or len(upto) == len(before):
            raise ValueError(f"slot {{{name}}}={values[name]!r} does not tokenize on its own in {text!r}: "
                             "it merges with the text around it. Choose other words or templates.")
        spans[name] = (len(before) + src.n_prefix, len(upto) + src.n_prefix)
    return Rendered(text=text, ids=src.with_bos(ids), spans=spans)


def most_common_length(lengths: Mapping[object, int], *, what: str) -> int:
    """The token length shared by the most items (ties: the shorter length)."""
    if not lengths:
        raise ValueError(f"no {what} left to choose a prompt length from")
    counts = Counter(lengths.values())
    return min(counts, key=lambda length: (-counts[length], length))


def options_from(cls: type[T], options: Mapping[str, object], task: str) -> T:
    """Build an options dataclass from keyword options, with a clear error for unknown names."""
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(options) - names)
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for task {task!r}; valid options: {sorted(names)}")
    return cls(**options)


def pad_id_for(src: TokenSource) -> int:
    """The token id that fills the padding: the tokenizer's pad, else EOS, else BOS, else 0.

    Causal models are right-padded, so no real position ever attends to a pad token and its value only
    needs to be a valid id.
    """
    tok = src.tokenizer
    for name in ("pad_token_id", "eos_token_id", "bos_token_id"):
        value = getattr(tok, name, None) if tok is not None else None
        if value is not None and 0 <= int(value) < src.d_vocab:
            return int(value)
    return 0


def pad_right(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[list[list[int]], list[list[int]] | None]:
    """Right-pad token lists to the longest: (padded ids, attention mask with 1 = real token).

    The mask is None when every list already has the same length (no padding needed).
    """
    longest = max((len(s) for s in seqs), default=0)
    if all(len(s) == longest for s in seqs):
        return [list(s) for s in seqs], None
    padded = [list(s) + [pad_id] * (longest - len(s)) for s in seqs]
    mask = [[1] * len(s) + [0] * (longest - len(s)) for s in seqs]
    return padded, mask
