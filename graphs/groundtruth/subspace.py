"""A hand-wired model whose causal variable lives in a known, rotated k-dimensional subspace.

Prompt: BOS, one content token t(x, y), two fillers, END. The answer at END is answer(x): variable X = x
(6 values) decides it, y (6 values, a nuisance) does not. Weights (1 layer, attention only, no norm):
- the residual stream (32 dims) is rotated by a seeded random orthogonal matrix Q, so no single neuron holds X:
  U = Q[:, 0:2] holds X as a point c_x on a circle, W = Q[:, 2:6] holds y as a Gaussian code of scale 3 (more
  variance than X, so PCA picks W first), and flag directions mark content, END, fillers, BOS;
- the one head attends from END to the content token (query reads the END flag, key the content flag, score
  40 vs 0) and copies U's coordinates back into U at END;
- the unembedding reads U: logit(answer(x')) = 5 c_x'·(Uᵀ h).
So X is at `resid_pre` layer 0 at the content position in exactly k = 2 dims (and, copied, at END after the
layer); the fillers and END's own embedding (`resid_pre` layer 0 at `filler`/`END`) carry nothing of X.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch
from transformer_lens.model_bridge import TransformerBridge

from circuitlab.graphs.groundtruth.builders import _load_full_state, _zeros_like_model
from circuitlab.patching.featurizers import random_rotation
from circuitlab.patching.interchange import Site
from circuitlab.patching.models import boot_native_model
from circuitlab.tasks.counterfactual import CounterfactualRow, Counterfactuals, assemble

SUBSPACE_CFG = dict(n_layers=1, d_model=32, n_heads=1, d_head=8, d_vocab=48, n_ctx=8, attn_only=True,
                    normalization_type=None, positional_embedding_type="standard", seed=0)
N_X, N_Y, K_TRUE = 6, 6, 2
BOS, END, FILLERS, CONTENT0, ANSWER0 = 0, 1, (2, 3, 4, 5), 6, 42


def content_token(x: int, y: int) -> int:
    return CONTENT0 + x * N_Y + y


@dataclass
class SubspaceGroundTruth:
    """The model, the true k and site, the sites that must stay at baseline, and its counterfactual pairs."""

    model: TransformerBridge
    k: int
    true_site: Site
    wrong_sites: list[Site]
    rotation: torch.Tensor  # [k, d_model]: the true subspace's rows

    def counterfactuals(self, n: int, seed: int = 0) -> Counterfactuals:
        """`n` base/source pairs differing in X (and in y and the fillers): expected = answer(source's x)."""
        rng = random.Random(seed)
        rows = []
        for _ in range(n):
            xb, xs = rng.sample(range(N_X), 2)
            base = [BOS, content_token(xb, rng.randrange(N_Y)), *rng.sample(FILLERS, 2), END]
            source = [BOS, content_token(xs, rng.randrange(N_Y)), *rng.sample(FILLERS, 2), END]
            pos = {"x": 1, "filler": 2, "END": 4}
            rows.append(CounterfactualRow(base, source, [ANSWER0 + xs], [ANSWER0 + xb], dict(pos), dict(pos),
                                          meta=dict(base_x=xb, source_x=xs)))
        return assemble(rows, task="subspace_x", variable="x", pad_id=BOS, info=dict(seed=seed))


def build_subspace_model(seed: int = 0) -> SubspaceGroundTruth:
    """Build the hand-wired model (see the module docstring); `seed` draws the rotation and the y codes."""
    model = boot_native_model(SUBSPACE_CFG)
    sd = _zeros_like_model(model)
    d, dh = SUBSPACE_CFG["d_model"], SUBSPACE_CFG["d_head"]
    gen = torch.Generator().manual_seed(seed)
    q = random_rotation(d, d, generator=gen).T  # columns: the rotated basis
    u, w = q[:, 0:K_TRUE], q[:, K_TRUE:K_TRUE + 4]
    flag_content, flag_end, flag_bos = q[:, 6], q[:, 7], q[:, 12]
    angles = torch.arange(N_X, dtype=torch.float32) * (2 * math.pi / N_X)
    codes = torch.stack([angles.cos(), angles.sin()], 1)  # [N_X, 2]
    nuisance = 3.0 * torch.randn(N_Y, 4, generator=gen)
    emb = sd["embed.weight"]
    emb[BOS], emb[END] = flag_bos, flag_end
    for j, tok in enumerate(FILLERS):
        emb[tok] = q[:, 8 + j]
    for x in range(N_X):
        for y in range(N_Y):
            emb[content_token(x, y)] = u @ codes[x] + w @ nuisance[y] + flag_content
    gain = 40.0 * math.sqrt(dh)
    sd["blocks.0.attn.q.weight"][0] = gain * flag_end
    sd["blocks.0.attn.k.weight"][0] = flag_content
    sd["blocks.0.attn.v.weight"][0:K_TRUE] = u.T
    sd["blocks.0.attn.o.weight"][:, 0:K_TRUE] = u
    for x in range(N_X):
        sd["unembed.weight"][ANSWER0 + x] = 5.0 * (u @ codes[x])
    _load_full_state(model, sd)
    model.eval()
    wrong = [Site("resid_pre", 0, "filler"), Site("resid_pre", 0, "END"), Site("resid_post", 0, "filler")]
    return SubspaceGroundTruth(model, K_TRUE, Site("resid_pre", 0, "x"), wrong, u.T.contiguous())
