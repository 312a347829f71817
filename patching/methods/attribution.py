"""Node attribution patching (Nanda 2023): a head's or MLP's score is (a_u^clean − a_u^corrupt) · dm/da_u, the sum
of its outgoing EAP edge scores; the edge scores are kept so that node scores are their sums."""

from circuitlab.patching.attribution import eap_scores
from circuitlab.patching.methods.registry import Method, MethodOptions, MethodScores, register
from circuitlab.patching.prompts import Prompts


def score(prompts: Prompts, options: MethodOptions) -> MethodScores:
    return MethodScores(edges=prompts.weighted(eap_scores))


ATTRIBUTION = register(Method("attribution", "node", False, "attribution patching of every head and MLP (sum of "
                              "its outgoing EAP edge scores)", score, circuit="eap", benchmark=False))
