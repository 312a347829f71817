"""Shared fixtures: a tiny TL-native model (fast) and SmolLM2-135M (slow, loaded once per session)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

from circuitlab.patching.models import boot_native_model, load_model, save_model

TINY_CONFIG = dict(n_layers=3, d_model=32, n_heads=4, d_head=8, d_mlp=64, d_vocab=64, n_ctx=64,
                   act_fn="gelu", normalization_type="LN", positional_embedding_type="standard", seed=0)


@pytest.fixture(scope="session")
def tiny_model():
    """A 3-layer LN/GELU native model with learned positions (random weights, seed 0)."""
    return boot_native_model(TINY_CONFIG)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """The tiny model saved as a native model directory, shared by the command-line tests (tests copy it before
    changing it)."""
    directory = tmp_path_factory.mktemp("tiny") / "model"
    save_model(boot_native_model(TINY_CONFIG), directory)
    return str(directory)


@pytest.fixture(scope="session")
def tiny_gqa_model():
    """A 2-layer RMS/rotary/gated native model with grouped-query attention (4 query, 2 kv heads)."""
    return boot_native_model(dict(n_layers=2, d_model=32, n_heads=4, d_head=8, d_mlp=48, d_vocab=64, n_ctx=64,
                                  act_fn="silu", gated_mlp=True, normalization_type="RMS",
                                  positional_embedding_type="rotary", n_key_value_heads=2, seed=1))


@pytest.fixture(scope="session")
def smollm2():
    """SmolLM2-135M-Instruct, offline, fp32."""
    return load_model("smollm2-135m")


@pytest.fixture(autouse=True)
def torch_global_state_is_left_alone():
    """No test or fixture may change torch's global gradient mode or default dtype for the tests after it: each
    code path that needs gradients turns them on locally (`torch.enable_grad()`), so it works under `no_grad`."""
    before = torch.is_grad_enabled(), torch.get_default_dtype()
    yield
    after = torch.is_grad_enabled(), torch.get_default_dtype()
    assert after == before, f"global torch state changed from {before} to {after}; use a context manager instead"
