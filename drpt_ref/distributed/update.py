"""The rest of a distributed Dr step: one answer of the projection for every rank, each rank's share of the
update, and the update summed over the ranks.

Program: d = alpha g_T + G w over the union of the units is a sum over ranks of
d_r = (alpha m_r / m) g_T,r + G_r w_r, with g_T,r the mean gradient of rank r's m_r target units and w_r its
share of w (eq. (3) in theory/distributed.md); each rank assembles d_r from its own capture (gram/update.py) and
one all_reduce sums them. The answer (alpha, w, objective, converged) is broadcast from rank 0, so the ranks
agree bit for bit even where their solvers would round differently.

Shapes: alpha (B,), w (B, n) global -> alpha_r (B,) (or ()), w_r (B, n_r) (or (n_r,)); update: name -> param shape
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist

from drpt_ref.distributed.ranks import Ranks


def broadcast_solution(ranks: Ranks, alpha, w, objective, converged):
    """Rank 0's (alpha (B,), w (B, n), objective (B,), converged (B,) bool) on every rank, one broadcast."""
    B, n = w.shape
    home = w.device
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(ranks.group) == "nccl" else home
    buf = torch.cat([x.reshape(-1).to(device=device, dtype=w.dtype) for x in (alpha, w, objective, converged)])
    src = dist.get_global_rank(ranks.group, 0) if ranks.group is not None else 0
    dist.broadcast(buf, src=src, group=ranks.group)  # (B (n + 3),)
    alpha, w, objective, converged = (x.to(home) for x in torch.split(buf, [B, B * n, B, B]))
    return alpha.clone(), w.reshape(B, n).clone(), objective.clone(), converged.to(torch.bool).cpu()


def local_coefficients(ranks: Ranks, shares: list, alpha: torch.Tensor, w: torch.Tensor):
    """This rank's coefficients for gram.update.assemble_update on its own capture (m_r target units), eq. (3) in
    theory/distributed.md: alpha_r = alpha m_r / m (assemble_update divides by m_r), w_r = w[..., start_r:stop_r].
    shares: [(n_r, m_r)] of every rank (gram.info['shares'])."""
    n_r, m_r = shares[ranks.rank]
    start = sum(s[0] for s in shares[:ranks.rank])
    m = sum(s[1] for s in shares)
    return alpha * (m_r / m), w[..., start:start + n_r]


def reduce_update(ranks: Ranks, update: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict]:
    """sum over ranks of every rank's d_r, one all_reduce per dtype. -> (name -> d, {bytes, seconds})

    bytes: what the ring all_reduce sends per rank, 2 (W - 1) / W of the message (eq. (4) in theory/distributed.md).
    """
    names = list(update)
    by_dtype: dict[torch.dtype, list[str]] = {}
    for name in names:
        by_dtype.setdefault(update[name].dtype, []).append(name)
    out, sent, seconds = {}, 0, 0.0
    for group in by_dtype.values():
        buf = torch.cat([update[name].reshape(-1) for name in group])  # one flat message per dtype
        if buf.device.type == "cuda":
            torch.cuda.synchronize(buf.device)
        t0 = time.perf_counter()
        dist.all_reduce(buf, group=ranks.group)
        if buf.device.type == "cuda":
            torch.cuda.synchronize(buf.device)
        seconds += time.perf_counter() - t0
        sent += buf.numel() * buf.element_size()
        for name, part in zip(group, torch.split(buf, [update[name].numel() for name in group])):
            out[name] = part.reshape(update[name].shape)
    ring = 2 * (ranks.world - 1) / ranks.world
    return {name: out[name] for name in names}, {"bytes": int(sent * ring), "seconds": seconds}
