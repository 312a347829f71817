"""EAP (Syed et al. 2023): score(u->v) = (a_u^clean − a_u^corrupt) · dm/dx_v at the clean run
(`patching.attribution.eap_scores`): one clean forward and backward per batch, plus the cached corrupted run."""

from circuitlab.patching.attribution import eap_scores
from circuitlab.patching.methods.registry import Method, MethodOptions, MethodScores, register
from circuitlab.patching.prompts import Prompts


def score(prompts: Prompts, options: MethodOptions) -> MethodScores:
    return MethodScores(edges=prompts.weighted(eap_scores))


EAP = register(Method("eap", "edge", False, "edge attribution patching: (a_clean - a_corrupt) . dm/dx_receiver at "
                      "the clean run", score, circuit="eap", leaderboard_order=1))
