import pytest
import torch

from circuitlab.patching.components import check_required_hooks
from circuitlab.patching.models import DEFAULT_MODEL, boot_native_model, list_models, load_model, save_model
from tests.conftest import TINY_CONFIG


def test_native_roundtrip_is_bit_identical(tmp_path, tiny_model):
    save_model(tiny_model, tmp_path / "m")
    again = load_model(str(tmp_path / "m"))
    for key, value in tiny_model.state_dict().items():
        assert torch.equal(value, again.state_dict()[key]), key
    tokens = torch.randint(0, TINY_CONFIG["d_vocab"], (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(tiny_model(tokens), again(tokens))


def test_native_models_boot_in_eval_mode_and_are_seeded():
    a, b = boot_native_model(TINY_CONFIG), boot_native_model(TINY_CONFIG)
    assert not a.training
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key])


def test_unknown_hub_name_fails_clearly_offline(monkeypatch):
    """Offline, an unknown hub name fails before any hub load or network probe (no minute of retries)."""
    import urllib.request

    from huggingface_hub import constants

    from circuitlab.patching import models

    tried = []
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # read at import time, maybe before conftest set it
    monkeypatch.setattr(models.TransformerBridge, "boot_transformers", lambda *a, **k: tried.append("load"))
    monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **k: tried.append("probe"))
    with pytest.raises(RuntimeError) as err:
        load_model("no-such-org/definitely-not-a-model")
    message = str(err.value)
    assert "no-such-org/definitely-not-a-model" in message and DEFAULT_MODEL in message and "HF_HUB_OFFLINE" in message
    assert tried == []


def test_missing_hooks_are_reported(tiny_model):
    class Fake:
        cfg = tiny_model.cfg
        hook_dict = {"hook_embed": None}
        hook_aliases = {}

        def get_hook_point(self, name):
            return None

    with pytest.raises(ValueError, match="lacks hooks"):
        check_required_hooks(Fake(), "fake")


def test_list_models_names_the_default():
    assert DEFAULT_MODEL in [m.name for m in list_models()]


def test_save_model_refuses_directory_without_model(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="neither"):
        load_model(str(tmp_path / "empty"))


@pytest.mark.slow
def test_smollm2_knows_paris(smollm2):
    tokens = smollm2.to_tokens("The Eiffel Tower is located in the city of")
    assert tokens[0, 0].item() == 1  # BOS prepended
    with torch.no_grad():
        logits = smollm2(tokens)
    assert smollm2.to_string(logits[0, -1].argmax()) == " Paris"


@pytest.mark.slow
def test_smollm2_does_ioi(smollm2):
    tokens = smollm2.to_tokens("When Mary and John went to the store, John gave a drink to")
    with torch.no_grad():
        last = smollm2(tokens)[0, -1]
    mary, john = smollm2.to_single_token(" Mary"), smollm2.to_single_token(" John")
    assert last[mary] > last[john]


@pytest.mark.slow
def test_smollm2_cache_rebuilds_when_corrupt(tmp_path, monkeypatch):
    from circuitlab.patching import models

    monkeypatch.setenv("CIRCUITLAB_CACHE", str(tmp_path))
    folder = models.smollm2_cache_dir()
    assert models._cache_is_valid(folder)
    with open(folder / "model.safetensors", "r+b") as handle:  # truncate: an interrupted copy
        handle.truncate(1000)
    assert not models._cache_is_valid(folder)
    again = models.smollm2_cache_dir()
    assert models._cache_is_valid(again)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left
