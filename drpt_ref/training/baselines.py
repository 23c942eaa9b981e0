"""Data-selection baselines as weight rules of the Dr step: random, LESS (online and offline), RDS.

Each rule returns (alpha, w) for the update d = alpha g_T + G w (theory/notation.md, eq. (1)), so it
trains the same covered parameters with the same optimizer as the Dr family, and its projection
objective 1/2 ||d - g_T||^2 is logged from the same Gram (dr_step.apply_rule). All use alpha = 0: a
selection baseline trains on (selected) general data, like `mean` and `topk`. The plain settings
`target`, `mean` and `mix` are Dr methods already (core/closed_forms.py, theory/endpoints.md).

    random   w = 1/k on k units drawn uniformly (seeded per step)       a vertex of the capped simplex, no signal
    less     w = 1/k on the top-k of cos(P g_i, P g_T)                   the topk LP (theory/topk.md) with a
             (P a seeded Kronecker projection, the sketch engine)        normalised, projected score
    rds      w = 1/k on the top-k of cos(h_i, mean_j h_T,j)               a capped-simplex vertex whose score is
             (h: last hidden state of the last token, unit-norm)         not a gradient: not the projection

Shapes: features (U, F); scores (n,); alpha (1,), w (1, n).
"""

from __future__ import annotations

import torch

from drpt_ref.core.closed_forms import topk_indices
from drpt_ref.gram.ghost import Capture, capture
from drpt_ref.gram.sketch import sketch_matrices
from drpt_ref.training.dr_step import StepContext, WeightRule
from drpt_ref.training.rep_features import l2_normalize, pool_last, pool_ramp, unit_features

RANDOM_SALT = 0x5EED  # keeps the random rule's stream apart from the sketch's, which also starts from the step seed


def k_of(ctx: StepContext) -> int:
    """The number of units to select: knobs.k rounded and clipped to [1, n], as the topk method."""
    return int(min(max(round(ctx.knobs.k), 1), ctx.b.shape[-1]))


def uniform_on(index, n: int, like: torch.Tensor) -> torch.Tensor:
    """w (1, n) with 1/k on the k given units (a vertex of the capped simplex, eq. (1) in theory/topk.md)."""
    index = torch.as_tensor(index, dtype=torch.long)
    w = torch.zeros(1, n, dtype=like.dtype)
    w[0, index] = 1.0 / len(index)
    return w


def cosine_scores(features: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """cos(f_i, reference) for each row. (n, F), (F,) -> (n,); a zero row scores 0."""
    return l2_normalize(features) @ l2_normalize(reference)


class RandomRule(WeightRule):
    """Random selection: w = 1/k on k general units drawn uniformly without replacement, alpha = 0.

    A special case of the framework only in the trivial sense that its update is a vertex of the capped
    simplex {0 <= w <= 1/k, sum w = 1}; the vertex is drawn at random, not chosen by the program, so it
    ignores both b and K. It is the zero-signal baseline every selection method must beat. The draw is
    seeded by the step's seed (and RANDOM_SALT), so a run is reproducible and resumes bitwise.
    """

    def __call__(self, ctx: StepContext):
        n, k = ctx.b.shape[-1], k_of(ctx)
        gen = torch.Generator().manual_seed(ctx.seed * 2 + RANDOM_SALT)
        index = torch.randperm(n, generator=gen)[:k].sort().values
        return torch.zeros(1), uniform_on(index, n, ctx.b), {"selected": index.tolist()}


def sketch_features(cap: Capture, dim: int, seed: int) -> torch.Tensor:
    """Projected per-unit gradients: per layer vec(P^T g_u Q) (+ Q^T bias gradient), concatenated. -> (U, F)

    The projection is the sketch engine's (gram/sketch.py, eq. (8) in theory/gram.md): the same seeded
    P, Q in the same order, so <f_u, f_v> is exactly the sketched Gram entry J_uv summed over layers.
    """
    gen = torch.Generator(device=cap.a[0].device).manual_seed(seed)  # the sketch engine's generator (its device)
    parts = []
    for layer, a, e in zip(cap.layers, cap.a, cap.e):
        P, Q = sketch_matrices(layer.d_in, layer.d_out, dim, gen, a.dtype)
        A = cap.per_unit(a @ P.to(a.device))  # (U, T_u, dim)
        E = cap.per_unit(e @ Q.to(e.device))  # (U, T_u, dim)
        parts.append(torch.bmm(A.transpose(1, 2), E).flatten(1))  # (U, dim^2) = vec(P^T g_u Q)
        if layer.has_bias:
            parts.append(E.sum(1))  # (U, dim) = Q^T (bias gradient)
    return torch.cat(parts, dim=1)


class LessRule(WeightRule):
    """LESS-style gradient-similarity selection (Xia et al. 2024), online or offline.

    Score of general unit i: cos(P g_i, P g_T), the cosine between its low-dimensional projected
    gradient and the projected target gradient (the mean of the target units' gradients). P is the
    seeded Kronecker sketch of the sketch engine (dim x dim per layer), fixed for the run (LESS too uses
    one projection, seed 0). `online`: every step, w = 1/k on the top-k of the general batch (ties to
    the lowest index, closed_forms.topk_indices). That is exactly the `topk` method of the framework
    (the LP over the capped simplex, theory/topk.md) with b_i replaced by b_i / (||g_i|| ||g_T||) computed
    from the sketched Gram: normalising removes the length bias LESS argues against (short sequences have
    large gradients). `offline`: once before training, with the initial model, score every unit of the
    general pool against the whole target set's gradient and keep the top `fraction` (at least
    `min_size` units); the steps then draw their general batches from that fixed subset and train on
    them uniformly (w = 1/n, the `mean` method on the subset), as LESS trains on its selected 5%.
    Not reproduced from LESS: the LoRA warm-up, Adam-preconditioned training gradients, several
    checkpoints weighted by learning rate, and the max over validation subtasks (we have one target task).
    """

    def __init__(self, mode: str = "online", dim: int = 16, seed: int = 0, fraction: float = 0.05,
                 min_size: int = 1, chunk: int = 32):
        if mode not in ("online", "offline"):
            raise ValueError(f"less mode must be 'online' or 'offline', got {mode!r}")
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"less fraction must be in (0, 1], got {fraction}")
        if not isinstance(dim, int) or dim < 1:
            raise ValueError(f"less dim must be a positive int, got {dim!r}")
        self.mode, self.dim, self.seed, self.fraction = mode, dim, seed, fraction
        self.min_size, self.chunk = min_size, chunk
        self.subset: list[int] | None = None  # offline: pool indices kept, ascending

    def scores(self, cap: Capture) -> torch.Tensor:
        """cos(P g_i, P g_T) of the capture's n general units, eq. (4) in theory/unified_view.md. -> (n,)"""
        feats = sketch_features(cap, self.dim, self.seed)  # (n + m, F)
        return cosine_scores(feats[:cap.n], feats[cap.n:].mean(0))

    def __call__(self, ctx: StepContext):
        n = ctx.b.shape[-1]
        if self.mode == "offline":  # the batch was drawn from the selected subset: train on it uniformly
            return torch.zeros(1), torch.full((1, n), 1.0 / n, dtype=ctx.b.dtype), {"subset_size": len(self.subset)}
        s = self.scores(ctx.cap)
        index = topk_indices(s.double().cpu().numpy(), k_of(ctx))  # ties -> lowest index
        return torch.zeros(1), uniform_on(index, n, ctx.b), {"selected": sorted(index.tolist()),
                                                             "scores": s.tolist()}

    def prepare(self, env) -> None:
        """Offline: score the whole pool once with the current (initial) model; keep the top fraction."""
        if self.mode != "offline":
            return
        target = env.build(env.target_set)
        scores = []
        for start in range(0, len(env.pool), self.chunk):
            general = env.build(env.pool[start:start + self.chunk])
            scores.append(self.scores(capture(env.model, env.unit_loss, general, target)))
        s = torch.cat(scores).double().cpu().numpy()  # (pool,)
        count = min(len(env.pool), max(self.min_size, round(self.fraction * len(env.pool))))
        self.subset = sorted(topk_indices(s, count).tolist())

    def restrict_pool(self, pool: list) -> list:
        if self.mode == "offline" and any(i >= len(pool) for i in self.subset):
            raise ValueError(f"the LESS subset indexes past the pool of {len(pool)} units")
        return pool if self.mode == "online" else [pool[i] for i in self.subset]

    def state_dict(self) -> dict:
        return {"subset": self.subset} if self.mode == "offline" else {}

    def load_state_dict(self, state: dict) -> None:
        """Restore the offline subset; ValueError unless `state` is what state_dict wrote for this mode."""
        if self.mode == "online":
            if state:
                raise ValueError(f"online LESS keeps no state, the checkpoint holds {sorted(state)}")
            return
        subset = state.get("subset")
        if set(state) != {"subset"} or not isinstance(subset, list) or not subset or \
                any(type(i) is not int or i < 0 for i in subset) or len(set(subset)) != len(subset):
            raise ValueError("the offline LESS state must be {'subset': [distinct pool indices]}, got "
                             f"keys {sorted(state)}")
        self.subset = list(subset)


class RdsRule(WeightRule):
    """RDS, representation similarity (as in the LESS code base): top-k by cosine of hidden states.

    Feature of a unit: the last hidden state at the last real token of each of its rows (`pool="last"`,
    as LESS's RDS), or their ramped mean over the answer tokens (`pool="mean"`, rep_features.pool_ramp
    with ramp 0), averaged over the unit's rows and L2-normalised. Score: cosine to the mean of the
    step's target units' features. w = 1/k on the top-k, alpha = 0. Its update is a vertex of the capped
    simplex, but the vertex is chosen by a representation score, not by b = G^T g_T, so it is not the
    solution of any program of the framework for this G and g_T: it is selection with a proxy signal.
    """

    needs_hidden = True

    def __init__(self, pool: str = "last"):
        if pool not in ("last", "mean"):
            raise ValueError(f"rds pool must be 'last' or 'mean', got {pool!r}")
        self.pool = pool

    def features(self, ctx: StepContext) -> torch.Tensor:
        batch = ctx.cap.batch
        if self.pool == "last":
            rows = pool_last(ctx.hidden, batch.attention_mask)  # (R, d) the <eos> of each row
        else:
            rows = pool_ramp(ctx.hidden, batch.loss_mask, 0.0)  # (R, d) the answer tokens' mean
        return unit_features(rows, batch.rows_per_unit)  # (n + m, d)

    def __call__(self, ctx: StepContext):
        f, n = self.features(ctx), ctx.cap.n
        s = cosine_scores(f[:n], f[n:].mean(0))  # (n,)
        index = topk_indices(s.double().cpu().numpy(), k_of(ctx))
        return torch.zeros(1), uniform_on(index, n, ctx.b), {"selected": sorted(index.tolist()),
                                                             "scores": s.tolist()}
