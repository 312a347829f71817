"""Training small attention-only TL-native models, seeded and resumable, with log-spaced checkpoints.

The model is booted with `TransformerBridge.boot_native` (so it starts from TransformerLens's own init) and
every checkpoint is written with `save_model`, loadable with `load_model(dir)`. The optimisation itself runs
on `FastAttnOnly`, a plain PyTorch module that holds the bridge's own state-dict tensors and computes the same
function with fused causal attention (`scaled_dot_product_attention`): on 2 CPU cores the native attention
(explicit mask and softmax over [batch, head, seq, seq]) made a step several times slower. `FastAttnOnly` only
claims what it reproduces (attention-only, learned or rotary positions, LN or no norm, no GQA, no soft-caps) and is
checked against the bridge's logits before training; any other configuration trains the bridge itself.

Resuming: `OUT/train_state.pt` (weights, optimizer, sampler RNG, loss log) is rewritten atomically at every
checkpoint; a rerun with the same config continues from it. A different config in the same folder is refused.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm
from transformer_lens.model_bridge import TransformerBridge

from circuitlab.patching.components import hook_name
from circuitlab.patching.models import save_model
from circuitlab.patching.reproducible import DEFAULT_THREADS, check_threads, pinned_threads

STATE_FILE = "train_state.pt"
LOG_COLUMNS = ["step", "tokens", "loss", "lr", "seconds"]


@dataclass(frozen=True)
class TrainConfig:
    """An attention-only model and how to train it. `steps` optimizer steps of `batch_size` × `n_ctx` tokens."""

    n_layers: int = 2
    d_model: int = 64
    n_heads: int = 4
    d_head: int = 16
    n_ctx: int = 256
    d_vocab: int = 256
    normalization_type: str | None = "LN"
    positional_embedding_type: str = "rotary"
    batch_size: int = 16
    steps: int = 600
    lr: float = 3e-3
    warmup: int = 20
    weight_decay: float = 0.0
    seed: int = 0
    n_checkpoints: int = 12
    n_linear_checkpoints: int = 24
    threads: int = DEFAULT_THREADS  # torch threads while training: the weights depend on it (patching.reproducible)

    def model_config(self) -> dict[str, object]:
        """The `boot_native` config dict of this model."""
        return dict(n_layers=self.n_layers, d_model=self.d_model, n_heads=self.n_heads, d_head=self.d_head,
                    n_ctx=self.n_ctx, d_vocab=self.d_vocab, attn_only=True,
                    normalization_type=self.normalization_type, positional_embedding_type=self.positional_embedding_type,
                    seed=self.seed)

    def validate(self) -> None:
        for name in ("n_layers", "d_model", "n_heads", "d_head", "n_ctx", "d_vocab", "batch_size", "steps",
                     "n_checkpoints", "n_linear_checkpoints"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"TrainConfig.{name} must be ≥ 1, got {getattr(self, name)}")
        if self.normalization_type not in (None, "LN"):
            raise ValueError(f"normalization_type {self.normalization_type!r}: use 'LN' or None")
        if self.positional_embedding_type not in ("standard", "rotary"):
            raise ValueError(f"positional_embedding_type {self.positional_embedding_type!r}: use 'standard' or 'rotary'")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        check_threads(self.threads)


def checkpoint_steps(steps: int, n: int, n_linear: int = 0) -> list[int]:
    """About `n` log-spaced steps in [0, steps] (always 0, 1 and `steps`) plus `n_linear` evenly spaced ones.

    Log spacing resolves early training; the even grid (as Pythia's every-1000-steps checkpoints) keeps a
    phase change late in training from falling between two distant log-spaced checkpoints.
    """
    if steps < 1 or n < 2 or n_linear < 0:
        raise ValueError(f"need steps ≥ 1, n ≥ 2 and n_linear ≥ 0, got steps={steps}, n={n}, n_linear={n_linear}")
    out = {0, steps}
    for i in range(n - 1):
        out.add(int(round(math.exp(math.log(steps) * i / (n - 2 if n > 2 else 1)))))
    for i in range(1, n_linear + 1):
        out.add(int(round(steps * i / n_linear)))
    return sorted(s for s in out if 0 <= s <= steps)


def checkpoint_name(step: int) -> str:
    """Folder name of a checkpoint: `step_000123`."""
    return f"step_{step:06d}"


class FastAttnOnly(nn.Module):
    """The function of an attention-only native bridge (learned or rotary positions, LN or no norm), fused attention.

    It keeps the bridge's state-dict names: `to_state_dict()` loads straight back into the bridge.
    """

    def __init__(self, bridge: TransformerBridge) -> None:
        super().__init__()
        cfg = bridge.cfg
        reason = unsupported_reason(bridge)
        if reason:
            raise ValueError(f"FastAttnOnly cannot reproduce this model: {reason}")
        self.n_layers, self.n_heads, self.d_head = cfg.n_layers, cfg.n_heads, cfg.d_head
        self.norm = cfg.normalization_type
        self.eps = float(cfg.eps)
        # Rotary models: the bridge's own cos/sin tables and rotation (buffers only, nothing to train).
        self.rotary = getattr(bridge.original_model, "rotary", None)
        state = bridge.state_dict(keep_vars=True)
        self._keys = list(state)
        self.params = nn.ParameterDict()
        for key, value in state.items():
            tensor = value.detach().clone()
            trainable = isinstance(value, nn.Parameter) and value.requires_grad
            self.params[key.replace(".", "__")] = nn.Parameter(tensor, requires_grad=trainable)

    def p(self, key: str) -> Tensor | None:
        name = key.replace(".", "__")
        return self.params[name] if name in self.params else None

    def _ln(self, x: Tensor, prefix: str) -> Tensor:
        if self.norm != "LN":
            return x
        return F.layer_norm(x, (x.shape[-1],), self.p(f"{prefix}.weight"), self.p(f"{prefix}.bias"), self.eps)

    def forward(self, tokens: Tensor, z_hooks: dict[int, list[Callable[..., Tensor]]] | None = None) -> Tensor:
        """Logits [batch, seq, vocab]; `z_hooks[layer]` edit the heads' outputs z [batch, pos, head, d_head]
        before W_O, like functions on the bridge's `blocks.{layer}.attn.hook_z`."""
        batch, seq = tokens.shape
        x = F.embedding(tokens, self.p("embed.weight"))
        if self.rotary is None:
            x = x + self.p("pos_embed.weight")[:seq]
        for layer in range(self.n_layers):
            pre = f"blocks.{layer}.attn"
            h = self._ln(x, f"blocks.{layer}.ln1")
            q, k, v = (F.linear(h, self.p(f"{pre}.{n}.weight"), self.p(f"{pre}.{n}.bias"))
                       .view(batch, seq, self.n_heads, self.d_head).transpose(1, 2) for n in "qkv")
            if self.rotary is not None:
                q, k = self.rotary.apply_rope(q, k)
            z = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2)
            for hook in (z_hooks or {}).get(layer, ()):
                z = hook(z, hook=None)
            z = z.reshape(batch, seq, self.n_heads * self.d_head)
            x = x + F.linear(z, self.p(f"{pre}.o.weight"), self.p(f"{pre}.o.bias"))
        x = self._ln(x, "ln_final")
        return F.linear(x, self.p("unembed.weight"), self.p("unembed.bias"))

    def to_state_dict(self) -> dict[str, Tensor]:
        return {key: self.params[key.replace(".", "__")].detach().clone() for key in self._keys}


def hooked_forward(model: TransformerBridge, fwd_hooks: Sequence[tuple[str, Callable[..., Tensor]]] = (), *,
                   check: Tensor | None = None) -> Callable[[Tensor], Tensor] | None:
    """A no-grad forward `tokens -> logits` of `model` with `fwd_hooks` on `hook_z`, run on `FastAttnOnly`.

    Why: measuring checkpoints (ICL loss curves, per-head ablations) through the bridge's hooked forward cost
    most of a phase study's time. Returns None (use the bridge) when the fast module cannot reproduce the model,
    when a hook is on anything but `blocks.{l}.attn.hook_z`, or when its logits on `check` (default: two random
    rows) differ from the bridge's by more than 1e-4 relative to the logits' scale.
    """
    if not hasattr(model, "cfg") or unsupported_reason(model):
        return None
    layers = {hook_name("z", layer): layer for layer in range(model.cfg.n_layers)}
    z_hooks: dict[int, list[Callable[..., Tensor]]] = {}
    for name, fn in fwd_hooks:
        if name not in layers:
            return None
        z_hooks.setdefault(layers[name], []).append(fn)
    fast = FastAttnOnly(model)
    if check is None:
        check = torch.randint(0, model.cfg.d_vocab, (2, min(model.cfg.n_ctx, 32)), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(check)
        gap = float((fast(check) - ref).abs().max())
    if gap > 1e-4 * max(1.0, float(ref.abs().max())):
        return None

    def run(tokens: Tensor) -> Tensor:
        with torch.no_grad():
            return fast(tokens, z_hooks)
    return run


def unsupported_reason(bridge: TransformerBridge) -> str:
    """Why `FastAttnOnly` cannot reproduce `bridge` ("" when it can)."""
    cfg = bridge.cfg
    checks = [
        (cfg.architecture == "TransformerLensNative", "not a TL-native model"),
        (bool(cfg.attn_only), "the model has MLPs"),
        ((cfg.positional_embedding_type or "standard") in ("standard", "rotary"), "positions are not standard/rotary"),
        (cfg.normalization_type in (None, "LN"), f"normalization {cfg.normalization_type!r}"),
        (getattr(cfg, "n_key_value_heads", None) in (None, cfg.n_heads), "grouped-query attention"),
        (float(getattr(cfg, "attn_scores_soft_cap", -1.0)) <= 0 and float(getattr(cfg, "output_logits_soft_cap", -1.0)) <= 0,
         "soft-capping"),
        (float(getattr(cfg, "attn_scale", -1.0)) in (-1.0, math.sqrt(cfg.d_head)) and cfg.use_attn_scale,
         "a non-standard attention scale"),
        (not cfg.final_rms and not getattr(cfg, "post_embedding_ln", False), "extra norms"),
    ]
    return "; ".join(msg for ok, msg in checks if not ok)


@dataclass
class TrainResult:
    """Where the checkpoints are (step → folder) and the per-step training log (columns `LOG_COLUMNS`)."""

    checkpoints: dict[int, Path]
    log: pd.DataFrame
    config: TrainConfig
    resumed_from: int = 0
    fast_path: bool = True
    seconds: float = 0.0
    info: dict[str, object] = field(default_factory=dict)


def _lr_at(cfg: TrainConfig, step: int) -> float:
    """Linear warm-up to `lr`, then constant (no decay: the phase change should not hide behind a schedule)."""
    return cfg.lr * min(1.0, (step + 1) / max(1, cfg.warmup))


def _atomic_save(obj: Any, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _write_checkpoint(bridge: Any, state: dict[str, Tensor], folder: Path) -> Path:
    bridge.load_state_dict(state, strict=False)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        save_model(bridge, tmp)
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


@torch.enable_grad()  # trains by backpropagation even when called under torch.no_grad()
def train_attn_only(config: TrainConfig, sample: Callable[[int, int, torch.Generator], Tensor],
                    out_dir: str | os.PathLike[str], *, progress: bool = True, fast: bool = True,
                    desc: str | None = None) -> TrainResult:
    """Train an attention-only model on batches from `sample(batch_size, seq_len + 1, generator)`.

    Checkpoints (log-spaced, see `checkpoint_steps`) go to `out_dir/step_XXXXXX/` via `save_model`; the loss
    log to `out_dir/train_log.csv`. Rerunning with the same config resumes; the result is the same either way
    (the sampler's generator state is saved with the weights). Training runs at `config.threads` torch threads
    with deterministic algorithms (`patching.reproducible.pinned_threads`): bit-identical on rerun, at any load.
    """
    config.validate()
    with pinned_threads(config.threads):
        return _train(config, sample, Path(out_dir), progress=progress, fast=fast, desc=desc)


def _train(config: TrainConfig, sample: Callable[[int, int, torch.Generator], Tensor], out: Path, *,
           progress: bool, fast: bool, desc: str | None) -> TrainResult:
    out.mkdir(parents=True, exist_ok=True)
    cfg_path = out / "train_config.json"
    if cfg_path.is_file() and json.loads(cfg_path.read_text()) != asdict(config):
        raise ValueError(f"{out} holds a training run with a different config ({cfg_path}); "
                         "use another output folder or delete it")
    cfg_path.write_text(json.dumps(asdict(config), indent=1))
    torch.manual_seed(config.seed)
    bridge = TransformerBridge.boot_native(config.model_config(), device="cpu")
    use_fast = fast and not unsupported_reason(bridge)
    if use_fast:
        net: nn.Module = FastAttnOnly(bridge)
        with torch.no_grad():
            probe = torch.randint(0, config.d_vocab, (2, min(config.n_ctx, 32)), generator=torch.Generator().manual_seed(0))
            gap = float((net(probe) - bridge(probe)).abs().max())
        if gap > 1e-4:
            raise RuntimeError(f"FastAttnOnly disagrees with the bridge by {gap:.2e} on random tokens; "
                               "retry with fast=False (the bridge itself trains)")
        params = [p for p in net.parameters() if p.requires_grad]
        forward, weights = net, lambda: net.to_state_dict()  # noqa: E731
    else:
        bridge.train()
        params = [p for p in bridge.parameters() if p.requires_grad]
        forward, weights = bridge, lambda: {k: v.detach().clone() for k, v in bridge.state_dict().items()}  # noqa: E731
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay, betas=(0.9, 0.99))
    generator = torch.Generator().manual_seed(config.seed + 1)
    log: list[dict[str, float]] = []
    start = 0
    state_path = out / STATE_FILE
    if state_path.is_file():
        saved = torch.load(state_path, weights_only=False)
        if saved.get("fast") != use_fast:
            raise ValueError(f"{state_path} was written by the {'fast' if saved.get('fast') else 'bridge'} trainer; "
                             "resume with the same `fast` setting")
        (net if use_fast else bridge).load_state_dict(saved["module"])
        optimizer.load_state_dict(saved["optimizer"])
        generator.set_state(saved["generator"])
        log, start = saved["log"], int(saved["step"])
    ckpt_steps = checkpoint_steps(config.steps, config.n_checkpoints, config.n_linear_checkpoints)
    checkpoints: dict[int, Path] = {}
    for step in ckpt_steps:
        folder = out / checkpoint_name(step)
        if step <= start and (folder / "model.safetensors").is_file():
            checkpoints[step] = folder
    began = time.perf_counter()
    elapsed0 = log[-1]["seconds"] if log else 0.0

    def save_state(step: int) -> None:
        checkpoints[step] = _write_checkpoint(bridge, weights(), out / checkpoint_name(step))
        _atomic_save({"module": (net if use_fast else bridge).state_dict(), "optimizer": optimizer.state_dict(),
                      "generator": generator.get_state(), "log": log, "step": step, "fast": use_fast}, state_path)

    if start == 0 and 0 not in checkpoints:
        save_state(0)
    bar = None
    if progress:
        bar = tqdm(total=config.steps, initial=start, desc=desc or f"train {config.n_layers}L", unit="step",
                   disable=None)  # a bar on a terminal only
    for step in range(start, config.steps):
        lr = _lr_at(config, step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = sample(config.batch_size, config.n_ctx + 1, generator)
        logits = forward(batch[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), batch[:, 1:].reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        log.append({"step": step + 1, "tokens": (step + 1) * config.batch_size * config.n_ctx,
                    "loss": float(loss.detach()), "lr": lr, "seconds": elapsed0 + time.perf_counter() - began})
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
        if step + 1 in ckpt_steps:
            save_state(step + 1)
    if bar is not None:
        bar.close()
    frame = pd.DataFrame(log, columns=LOG_COLUMNS)
    frame.to_csv(out / "train_log.csv", index=False)
    return TrainResult(dict(sorted(checkpoints.items())), frame, config, start, use_fast,
                       float(frame["seconds"].iloc[-1]) if len(frame) else 0.0)


__all__ = ["FastAttnOnly", "hooked_forward", "LOG_COLUMNS", "TrainConfig", "TrainResult", "checkpoint_name", "checkpoint_steps",
           "train_attn_only", "unsupported_reason"]
