"""circuitlab.patching: models, the component vocabulary, and the causal engine."""

from circuitlab.patching.components import COMPONENT_KINDS, canonical_kind, edge_name, hook_name, parse_edge, parse_node
from circuitlab.patching.models import DEFAULT_MODEL, boot_native_model, list_models, load_model, save_model, weight_hash

__all__ = [
    "COMPONENT_KINDS", "DEFAULT_MODEL", "boot_native_model", "canonical_kind", "edge_name", "hook_name",
    "list_models", "load_model", "parse_edge", "parse_node", "save_model", "weight_hash",
]
