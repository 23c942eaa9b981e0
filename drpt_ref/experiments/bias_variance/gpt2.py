"""Measured bias and variance on the tiny GPT-2 (SFT on the task suite), with a large target set as the truth.

The truth is g* = the gradient of the mean SFT loss over N held-out target units (eval split of the
target task), on the covered parameters (the linear layers, theory/dr_step.md section 3), at the
model's current weights. Each resample r draws m of those N units without replacement, so
E_r[g_T^(r)] = g* exactly and target-only training is unbiased by construction. The general batches
(S draws of n units from the general pool) are fixed across resamples.

Only inner products are needed. One capture over [all general units; the N target units] gives the
joint unit Gram J = F F^T (ghost, exact; gram/ghost.py), summed over layers. Its eigendecomposition
J = V diag(lam) V^T gives an isometric embedding F = V diag(lam)^(1/2): row u of F has the inner
products of unit u's gradient with every other unit's, so every norm below is the norm in parameter
space (eq. (6) in theory/bias_variance.md), computed in U dimensions instead of 593k.

Shapes:
    J (U, U), U = S n + N  ->  F (U, U);  G (S, U, n), g_T (S, R, U), g* (U,)  ->  bias_variance.measure
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import torch

from drpt_ref.data.tasks import TARGET, general_pool, get_task
from drpt_ref.experiments.bias_variance.measure import measure, spectrum
from drpt_ref.gram.ghost import capture, ghost_joint_gram
from drpt_ref.gram.layers import covered_parameters
from drpt_ref.losses.sft import SFTLoss
from drpt_ref.training.dr_step import freeze_uncovered
from drpt_ref.training.model_folder import load_model_folder
from drpt_ref.training.train_data import sft_batch


@dataclass
class GPT2Config:
    """The tiny GPT-2 problem (SFT)."""

    model: str = "small_models/gpt2-tiny"  # the model folder (nothing is downloaded)
    n_general: int = 32  # n, general units per batch
    m_target: int = 4  # m, target units per resample
    target_set: int = 256  # N, held-out target units whose mean gradient is the truth g*
    resamples: int = 200  # R target batches per general batch
    general_draws: int = 4  # S fixed general batches (bias and variance conditional on each, then averaged)
    pool_size: int = 2000  # the general pool the batches are drawn from
    seed: int = 0


def unit_embedding(J: torch.Tensor) -> tuple[torch.Tensor, float]:
    """F (U, U) with F F^T = J (eigenvalues clipped at 0), and the clipped mass relative to tr J."""
    lam, V = torch.linalg.eigh(J)  # J = V diag(lam) V^T
    clipped = float(lam.clamp_max(0).abs().sum() / lam.clamp_min(0).sum())
    return V * lam.clamp_min(0).sqrt(), clipped  # (U, U): column scaling


def gpt2_problem(cfg: GPT2Config):
    """G (S, U, n), g_T (S, R, U), g* (U,) and an info dict, from one capture of the model."""
    for name in ("n_general", "m_target", "target_set", "resamples", "general_draws"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"{name}={getattr(cfg, name)} must be >= 1")
    if cfg.m_target > cfg.target_set:
        raise ValueError(f"m_target={cfg.m_target} must be <= target_set={cfg.target_set}")
    if not os.path.isdir(cfg.model):
        raise ValueError(f"model={cfg.model!r} is not a folder; build it with `drpt build-model`")
    S, n, N, R, m = cfg.general_draws, cfg.n_general, cfg.target_set, cfg.resamples, cfg.m_target
    if S * n > cfg.pool_size:
        raise ValueError(f"general_draws * n_general = {S * n} exceeds pool_size={cfg.pool_size}")
    model, tok = load_model_folder(cfg.model, "--model")  # safetensors only
    model = model.to(torch.float64).eval()  # float64: exact Gram
    freeze_uncovered(model)
    gen = torch.Generator().manual_seed(cfg.seed)
    pool = general_pool(cfg.pool_size, cfg.seed, "train", "sft")
    general = [pool[i] for i in torch.randperm(len(pool), generator=gen)[:S * n].tolist()]  # S n distinct units
    target = get_task(TARGET).sft(N, cfg.seed, "eval")  # the held-out target set
    cap = capture(model, SFTLoss(), sft_batch(tok, general), sft_batch(tok, target))
    J, _ = ghost_joint_gram(cap)
    F, clipped = unit_embedding(J.sum(0))  # (U, U), eq. (6)
    G = F[:S * n].reshape(S, n, -1).transpose(1, 2)  # (S, U, n)
    F_T = F[S * n:]  # (N, U)
    g_star = F_T.mean(0)  # (U,): the gradient of the mean loss over the N target units
    idx = torch.stack([torch.randperm(N, generator=gen)[:m] for _ in range(S * R)]).reshape(S, R, m)
    gT = F_T[idx].mean(2)  # (S, R, U)
    info = dict(dataclasses.asdict(cfg), covered_parameters=sum(
        p.numel() for name, p in model.named_parameters() if name in set(covered_parameters(model))),
        units=S * n + N, clipped_eigen_mass=f"{clipped:.1e}", general_tasks=sorted({u.task for u in general}),
        target_loss=f"{float(cap.losses[S * n:].mean()):.3f}", general_loss=f"{float(cap.losses[:S * n].mean()):.3f}")
    return G, gT, g_star, info


def run_gpt2(cfg: GPT2Config, points: int = 9, progress: bool = False):
    """(rows, info) of the GPT-2 problem's spectrum."""
    G, gT, g_star, info = gpt2_problem(cfg)
    return measure(G, gT, g_star, spectrum(cfg.n_general, points), progress), info
