"""The chance reference: seeded standard-normal edge scores (`random`)."""

import torch

from circuitlab.patching.methods.registry import Method, MethodOptions, MethodScores, register
from circuitlab.patching.prompts import Prompts


def score(prompts: Prompts, options: MethodOptions) -> MethodScores:
    return MethodScores(edges=torch.randn(prompts.graph.n_edges, generator=torch.Generator().manual_seed(options.seed)))


RANDOM = register(Method("random", "edge", False, "seeded standard-normal edge scores (chance reference)", score,
                         leaderboard_order=0))
