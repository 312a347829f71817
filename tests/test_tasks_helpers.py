"""Tokenizers for the task tests (no tests here): SmolLM2's, and a toy GPT-2-style byte-level BPE that
writes years as ' 17' + 'YY', so greater-than can be tested offline."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from functools import lru_cache

GREATER_THAN_WORDS = ("The", "Ġwar", "Ġlasted", "Ġfrom", "Ġthe", "Ġyear", "Ġto", "Ġsiege", "Ġempire", "Ġreign",
                      "Ġdynasty", "Ġcampaign")


@lru_cache(maxsize=1)
def smollm2_tokenizer():
    """The SmolLM2 tokenizer from the offline cache (no model weights loaded)."""
    from transformers import AutoTokenizer

    from circuitlab.patching.models import smollm2_cache_dir

    return AutoTokenizer.from_pretrained(str(smollm2_cache_dir()))


def _byte_bpe(pieces):
    """A byte-level BPE whose merges build each of `pieces` (in order) and the greater-than words."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<|endoftext|>": 0}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    merges = []

    def add(word):
        current = word[0]
        for ch in word[1:]:
            if current + ch not in vocab:
                vocab[current + ch] = len(vocab)
                merges.append((current, ch))
            current += ch

    for piece in pieces:
        add(piece)
    for word in GREATER_THAN_WORDS:
        add(word)
    model = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    model.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    model.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=model, bos_token="<|endoftext|>", eos_token="<|endoftext|>")


@lru_cache(maxsize=1)
def gpt2_style_tokenizer():
    """A byte-level BPE with merges for a few words, ' 17' and every two-digit number.

    The ' 17' merges rank first, so ' 1732' becomes [' 17', '32'] as with GPT-2. BOS = '<|endoftext|>' (id 0).
    """
    return _byte_bpe(["Ġ17"] + [a + b for a in "0123456789" for b in "0123456789"])


@lru_cache(maxsize=1)
def odd_year_tokenizer():
    """Like `gpt2_style_tokenizer` but with ' 173' merged and no two-digit numbers: ' 1732' → [' 173', '2'],
    ' 1705' → [' 17', '0', '5']; neither of greater-than's two year modes."""
    return _byte_bpe(["Ġ173"])
