"""EAP-IG (Hanna et al. 2024, "inputs" variant): EAP with the gradient averaged over `steps` runs whose input
embeddings go from corrupted to clean (`patching.attribution.eap_ig_scores`)."""

from circuitlab.patching.attribution import eap_ig_scores
from circuitlab.patching.methods.registry import Method, MethodOptions, MethodScores, register
from circuitlab.patching.prompts import Prompts


def score(prompts: Prompts, options: MethodOptions) -> MethodScores:
    return MethodScores(edges=prompts.weighted(
        lambda ctx: eap_ig_scores(ctx, steps=options.steps, progress=options.progress)))


EAP_IG = register(Method("eap-ig", "edge", False, "EAP with gradients integrated over input embeddings corrupt -> "
                         "clean", score, circuit="eap-ig", leaderboard_order=3))
