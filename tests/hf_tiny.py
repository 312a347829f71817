"""Tiny random-init Hugging Face models of every family circuitlab supports, built offline from config classes.

Each model has 2 layers, d_model 64 and 4 query heads (2 key/value heads where the family has grouped-query
attention), SmolLM2's tokenizer (from the offline model cache), 2-D weights scaled by 3 so patching effects are
not ~0, and is saved with `save_pretrained` so it loads through `load_model(dir)` like a hub checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch

SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=128)


def _llama_like(cls_name: str, **extra: Any) -> Callable[[int], Any]:
    def build(vocab: int) -> Any:
        import transformers

        return getattr(transformers, cls_name)(vocab_size=vocab, num_key_value_heads=2, **SMALL, **extra)
    return build


def _gpt2(vocab: int) -> Any:
    from transformers import GPT2Config

    return GPT2Config(vocab_size=vocab, n_layer=2, n_embd=64, n_head=4, n_positions=128)


def _gptj(vocab: int) -> Any:
    from transformers import GPTJConfig

    return GPTJConfig(vocab_size=vocab, n_layer=2, n_embd=64, n_head=4, n_positions=128, rotary_dim=8)


def _neox(vocab: int) -> Any:
    from transformers import GPTNeoXConfig

    return GPTNeoXConfig(vocab_size=vocab, rotary_pct=0.25, use_parallel_residual=True, **SMALL)


def _opt(vocab: int) -> Any:
    from transformers import OPTConfig

    return OPTConfig(vocab_size=vocab, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                     max_position_embeddings=128, word_embed_proj_dim=64)


FAMILIES: dict[str, Callable[[int], Any]] = {
    "gpt2": _gpt2,
    "gptj": _gptj,
    "gpt_neox": _neox,
    "opt": _opt,
    "llama": _llama_like("LlamaConfig"),
    "mistral": _llama_like("MistralConfig"),
    "qwen2": _llama_like("Qwen2Config"),
    "qwen3": _llama_like("Qwen3Config", head_dim=16),
    "gemma": _llama_like("GemmaConfig", head_dim=16),
    "gemma2": _llama_like("Gemma2Config", head_dim=16, sliding_window=4, query_pre_attn_scalar=16),
    "gemma3": _llama_like("Gemma3TextConfig", head_dim=16, sliding_window=4, query_pre_attn_scalar=16),
    "phi3": _llama_like("Phi3Config"),
    "olmo2": _llama_like("Olmo2Config"),
}


def smollm2_tokenizer() -> Any:
    """SmolLM2's tokenizer from the offline model cache (builds the cache once if needed)."""
    from transformers import AutoTokenizer

    from circuitlab.patching.models import smollm2_cache_dir

    return AutoTokenizer.from_pretrained(str(smollm2_cache_dir()))


def build_tiny(family: str, directory: str | Path, *, tokenizer: Any = None, seed: int = 0, scale: float = 3.0,
               size: dict[str, int] | None = None) -> Path:
    """Build a tiny random `family` model, scale its 2-D weights, save it with a tokenizer; return the folder.

    `size` overrides config fields by their generic names (`num_hidden_layers`, `hidden_size`,
    `num_attention_heads`, `intermediate_size`), e.g. for benchmarks where timings must mean something."""
    from transformers import AutoModelForCausalLM

    tokenizer = tokenizer or smollm2_tokenizer()
    config = FAMILIES[family](len(tokenizer))
    for key, value in (size or {}).items():
        setattr(config, key, value)  # GPT-2's n_layer/n_embd/n_head answer to the generic names
    types = getattr(config, "layer_types", None)  # per-layer attention kinds, sized at construction
    if types is not None and len(types) != config.num_hidden_layers:
        config.layer_types = [types[i % len(types)] for i in range(config.num_hidden_layers)]
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 2 and "embed" not in name and "wte" not in name and "wpe" not in name:
                param.mul_(scale)
    directory = Path(directory)
    model.save_pretrained(str(directory))
    tokenizer.save_pretrained(str(directory))
    return directory


def hf_pattern_patched_logits(model: Any, family: str, clean: Any, corrupt: Any, layer: int, head: int,
                              pos: int | None) -> Any:
    """Logits of the bridge's wrapped HF model (eager attention) on `corrupt`, with head `head`'s attention
    probabilities at layer `layer` (query position `pos`, or all) set to their values on `clean`.

    An independent reference for pattern patching: it edits the probabilities inside HF's own eager attention
    function, not through any TransformerLens hook (on GPT-J/OPT bridges `hook_pattern` fires too late)."""
    import importlib

    module = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
    eager = module.eager_attention_forward
    hf = model.original_model
    assert hf.config._attn_implementation == "eager", hf.config._attn_implementation
    saved: dict[int, Any] = {}
    sel = (slice(None), head) if pos is None else (slice(None), head, pos)

    def recording(mod: Any, query: Any, key: Any, value: Any, mask: Any, scaling: float, dropout: float = 0.0,
                  **kw: Any) -> Any:
        out, weights = eager(mod, query, key, value, mask, scaling=scaling, dropout=dropout, **kw)
        saved[mod.layer_idx] = weights
        return out, weights

    def patching(mod: Any, query: Any, key: Any, value: Any, mask: Any, scaling: float, dropout: float = 0.0,
                 **kw: Any) -> Any:
        out, weights = eager(mod, query, key, value, mask, scaling=scaling, dropout=dropout, **kw)
        if mod.layer_idx != layer:
            return out, weights
        weights = weights.clone()
        weights[sel] = saved[layer][sel]
        return torch.matmul(weights.to(value.dtype), value).transpose(1, 2).contiguous(), weights

    try:
        with torch.no_grad():
            module.eager_attention_forward = recording
            hf(input_ids=clean)
            module.eager_attention_forward = patching
            return hf(input_ids=corrupt).logits
    finally:
        module.eager_attention_forward = eager
