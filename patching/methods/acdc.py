"""ACDC (Conmy et al. 2023) as a method: greedy exact edge pruning (`patching.acdc.acdc`); an edge's score is the
objective change its removal caused, and its kept edges rank above the removed ones."""

from circuitlab.patching.acdc import acdc
from circuitlab.patching.methods.registry import Method, MethodOptions, MethodScores, register
from circuitlab.patching.prompts import Prompts


def score(prompts: Prompts, options: MethodOptions) -> MethodScores:
    threshold = options.acdc_threshold
    if options.acdc_objective == "metric":  # a fraction of |m(clean) − m(corrupt)|
        clean, corrupt = prompts.baseline()
        threshold *= abs(float(clean.double().mean() - corrupt.double().mean()))
    result = acdc(prompts, threshold, objective=options.acdc_objective, progress=options.progress)
    return MethodScores(edges=result.scores, kept=result.kept.bool())


ACDC = register(Method("acdc", "edge", True, "greedy exact edge pruning; score = objective change, kept edges ranked "
                       "above removed ones", score, max_edges=5000, leaderboard_order=5))
