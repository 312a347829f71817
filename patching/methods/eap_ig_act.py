"""EAP-IG on activations (`eap-ig-act`): EAP with gradients integrated along a path through the activations,
every edge kept at alpha = k/steps of its clean contribution (`patching.attribution.eap_ig_activation_scores`)."""

from circuitlab.patching.attribution import eap_ig_activation_scores
from circuitlab.patching.methods.registry import Method, MethodOptions, MethodScores, register
from circuitlab.patching.prompts import Prompts


def score(prompts: Prompts, options: MethodOptions) -> MethodScores:
    return MethodScores(edges=prompts.weighted(
        lambda ctx: eap_ig_activation_scores(ctx, steps=options.steps, progress=options.progress)))


EAP_IG_ACT = register(Method("eap-ig-act", "edge", False, "EAP with gradients integrated over edge activations "
                             "corrupt -> clean (every edge at alpha = k/steps)", score, circuit="ranking-edges",
                             benchmark=False, leaderboard_order=4))
