"""A minimal task for engine tests on tiny random models: logit difference at the last position."""

from dataclasses import dataclass, field

import torch


@dataclass
class ToyPairs:
    clean_tokens: torch.Tensor
    corrupt_tokens: torch.Tensor
    answer_ids: torch.Tensor
    wrong_ids: torch.Tensor
    positions: dict = field(default_factory=dict)
    attention_mask: object = None


class ToyTask:
    """Logit of a fixed answer minus a fixed wrong token at the final position."""

    name = "toy"
    metric_name = "logit_diff"

    def read_positions(self, pairs):
        batch, seq = pairs.clean_tokens.shape
        return torch.full((batch, 1), seq - 1, dtype=torch.long)

    def metric_at(self, logits_at, pairs):
        rows = torch.arange(logits_at.shape[-3])
        return logits_at[..., rows, 0, pairs.answer_ids[:, 0]] - logits_at[..., rows, 0, pairs.wrong_ids[:, 0]]

    def metric(self, logits, pairs):
        return self.metric_at(logits[:, -1:, :], pairs)


def toy_pairs(vocab: int, batch: int = 4, seq: int = 10, seed: int = 0) -> ToyPairs:
    """Random prompts; the corrupt prompt differs at positions 2-4; role X sits at position 3 (or 5 in odd rows)."""
    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(0, vocab, (batch, seq), generator=g)
    corrupt = clean.clone()
    corrupt[:, 2:5] = torch.randint(0, vocab, (batch, 3), generator=g)
    answer = torch.randint(0, vocab, (batch, 1), generator=g)
    wrong = (answer + 1 + torch.randint(0, vocab - 1, (batch, 1), generator=g)) % vocab
    roles = {"X": torch.tensor([3 if i % 2 == 0 else 5 for i in range(batch)]), "END": torch.full((batch,), seq - 1)}
    return ToyPairs(clean, corrupt, answer, wrong, roles)
