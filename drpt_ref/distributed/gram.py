"""The global K, b, c of a Dr step whose units are spread over ranks: what each rank gathers, layer by layer.

Program: the joint Gram J^(l) of eq. (1) in theory/gram.md over the union of every rank's units, in the order of
the single-process batch of that union, [general of rank 0 .. rank W-1; target of rank 0 .. rank W-1], then
K, b, c by eq. (2) there with the global n and m. The cross-rank inner products need other ranks' data; per layer
each rank contributes one of (theory/distributed.md, section 2)

    tokens   its captured inputs a (R_r, T, d_in) and output gradients e (R_r, T, d_out): J by the ghost forms
    units    its per-unit layer gradients F_r (U_r, p_l) (small for LoRA factors and short batches): J = F F^T

exactly (--gram ghost; the exact engine always sends the per-unit gradients it computed), or the same of the
sketched a P and e Q (--gram sketch: tokens (R_r, T, k) twice, or units (U_r, k^2 + k)). comm="auto" sends, per
layer, the form with fewer bytes (eq. (2) in theory/distributed.md). Two collectives: an all_gather of the sizes,
then one all_gather of every layer's pieces packed into one buffer per dtype. Every rank builds the same J.

Shapes:
    sizes (W, 4) long: n_r, m_r, T_r, rows_per_unit; R_r = (n_r + m_r) rows_per_unit rows, U_r = n_r + m_r units
    sent per layer: tokens (R_max, T_max, d_in) and (R_max, T_max, d_out), or units (U_max, p_l), zero-padded
    J (L, n + m, n + m) -> Gram: K (L, n, n), b (L, n), c (L,); info["losses"] (n + m,) every unit's loss
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist

from drpt_ref.distributed.ranks import COMMS, Ranks
from drpt_ref.gram.compute import Gram, kbc_from_joint
from drpt_ref.gram.ghost import Capture, layer_joint_gram, materialized_flat
from drpt_ref.gram.precision import accumulation_dtype, no_autocast, widen
from drpt_ref.gram.sketch import sketch_matrices


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def exchange_sizes(ranks: Ranks, cap: Capture) -> torch.Tensor:
    """Every rank's (n_r, m_r, T_r, rows_per_unit). -> (W, 4) long on the CPU; ValueError if the paradigms differ."""
    device = cap.a[0].device
    mine = torch.tensor([cap.n, cap.m, cap.batch.input_ids.shape[1], cap.batch.rows_per_unit], device=device)
    out = [torch.empty_like(mine) for _ in range(ranks.world)]
    dist.all_gather(out, mine, group=ranks.group)
    sizes = torch.stack(out).cpu()  # (W, 4)
    if len(set(sizes[:, 3].tolist())) != 1:
        raise ValueError(f"rows per unit differ across ranks ({sizes[:, 3].tolist()}): every rank must run the same "
                         "paradigm and GRPO group size.")
    return sizes


def choose_form(comm: str, tokens_bytes: int, units_bytes: int) -> str:
    """tokens or units for one layer, eq. (2) in theory/distributed.md: the smaller message under comm='auto'."""
    if comm not in COMMS:
        raise ValueError(f"comm={comm!r} is unknown; use one of {COMMS} (--comm).")
    if comm != "auto":
        return comm
    return "tokens" if tokens_bytes <= units_bytes else "units"


def _pad(x: torch.Tensor, shape: tuple) -> torch.Tensor:
    """x in the leading corner of zeros of `shape` (padded rows and tokens carry e = 0: they add nothing)."""
    out = x.new_zeros(shape)
    out[tuple(slice(0, s) for s in x.shape)] = x
    return out


def _local_pieces(cap: Capture, engine: str, flat, sketch_dim: int, seed: int, comm: str, R: int, T: int, U: int):
    """This rank's padded tensors of every layer and the form chosen for each. -> (pieces, forms)"""
    gen = torch.Generator(device=cap.a[0].device).manual_seed(seed)  # as gram/sketch.py: the same P, Q on every rank
    pieces, forms = [], []
    for l, (layer, a, e) in enumerate(zip(cap.layers, cap.a, cap.e)):
        if engine == "exact":
            if comm == "tokens":
                raise ValueError("--comm tokens sends captured a and e for the ghost and sketch engines; the exact "
                                 "engine gathers the per-unit gradients it computed: use --comm auto or units.")
            pieces.append([_pad(flat[l], (U, flat[l].shape[1]))])
            forms.append("units")
            continue
        acc = accumulation_dtype(a, e)
        if engine == "sketch":
            a, e = widen(a, e)
            P, Q = sketch_matrices(layer.d_in, layer.d_out, sketch_dim, gen, a.dtype)
            with no_autocast(a):
                a, e = a @ P, e @ Q  # (R_r, T_r, k) each
        d_in, d_out = a.shape[-1], e.shape[-1]
        p_l = d_in * d_out + (d_out if layer.has_bias else 0)
        form = choose_form(comm, R * T * (d_in * a.element_size() + d_out * e.element_size()),
                           U * p_l * torch.finfo(acc).bits // 8)
        if form == "tokens":
            pieces.append([_pad(a, (R, T, d_in)), _pad(e, (R, T, d_out))])
        else:
            F = materialized_flat(cap.per_unit(a), cap.per_unit(e), layer.has_bias)  # (U_r, p_l)
            pieces.append([_pad(F, (U, p_l))])
        forms.append(form)
    return pieces, forms


def _all_gather_packed(ranks: Ranks, tensors: list[torch.Tensor]) -> tuple[list[list[torch.Tensor]], int]:
    """Every rank's copy of `tensors` (same shapes on every rank), one all_gather per dtype.
    -> (per rank, the tensors in order; bytes of this rank's buffers)"""
    by_dtype: dict[torch.dtype, list[int]] = {}
    for i, t in enumerate(tensors):
        by_dtype.setdefault(t.dtype, []).append(i)
    out = [[None] * len(tensors) for _ in range(ranks.world)]
    sent = 0
    for idx in by_dtype.values():
        buf = torch.cat([tensors[i].reshape(-1) for i in idx])  # one flat message per dtype
        sent += buf.numel() * buf.element_size()
        got = [torch.empty_like(buf) for _ in range(ranks.world)]
        dist.all_gather(got, buf, group=ranks.group)
        for r, g in enumerate(got):
            for i, part in zip(idx, torch.split(g, [tensors[i].numel() for i in idx])):
                out[r][i] = part.reshape(tensors[i].shape)
    return out, sent


def _union(parts: list[torch.Tensor], sizes: torch.Tensor) -> torch.Tensor:
    """Per-rank unit-major tensors (U_max, ...) -> the union (n + m, ...): general units of every rank, then target."""
    n_r, m_r = sizes[:, 0].tolist(), sizes[:, 1].tolist()
    general = [x[:n] for x, n in zip(parts, n_r)]
    target = [x[n:n + m] for x, n, m in zip(parts, n_r, m_r)]
    return torch.cat(general + target)


def global_gram(ranks: Ranks, cap: Capture, engine: str = "ghost", *, flat=None, sketch_dim: int = 64, seed: int = 0,
                comm: str = "auto", ghost_mode: str = "auto") -> Gram:
    """K, b, c per covered layer over every rank's units (the Gram of one process on the union of the batches).

    cap: this rank's capture; engine "ghost" | "sketch" | "exact" (then flat: L x (U_r, p_l), this rank's
    per-unit gradients of gram/exact.py). The same call on every rank, in the same order (collectives).
    info: modes (the J form per layer), comm (tokens | units per layer), shares [(n_r, m_r)], losses (n + m,),
    bytes (this rank's all_gather message), seconds (in the collectives).
    """
    if engine not in ("ghost", "sketch", "exact"):
        raise ValueError(f"engine must be 'ghost', 'sketch' or 'exact', got {engine!r}")
    device = cap.a[0].device
    t0 = time.perf_counter()
    sizes = exchange_sizes(ranks, cap)  # (W, 4)
    seconds = time.perf_counter() - t0
    n_r, m_r, rpu = sizes[:, 0], sizes[:, 1], int(sizes[0, 3])
    U, T = int((n_r + m_r).max()), int(sizes[:, 2].max())
    pieces, forms = _local_pieces(cap, engine, flat, sketch_dim, seed, comm, U * rpu, T, U)
    losses = _pad(cap.losses.reshape(-1, 1), (U, 1))  # (U_max, 1)
    _sync(device)
    t0 = time.perf_counter()
    gathered, sent = _all_gather_packed(ranks, [losses] + [t for p in pieces for t in p])
    _sync(device)
    seconds += time.perf_counter() - t0
    blocks, modes, k = [], [], 1
    for layer, form, piece in zip(cap.layers, forms, pieces):
        if form == "tokens":
            units = [[g[k + j][: int(u) * rpu].reshape(int(u), rpu * T, -1) for j in range(2)]
                     for g, u in zip(gathered, n_r + m_r)]  # per rank: A_r (U_r, rpu T, d_in), E_r (U_r, rpu T, d_out)
            A = _union([x[0] for x in units], sizes)  # (n + m, rpu T, d_in)
            E = _union([x[1] for x in units], sizes)  # (n + m, rpu T, d_out)
            J, mode = layer_joint_gram(A, E, layer.has_bias, ghost_mode)
        else:
            F = widen(_union([g[k] for g in gathered], sizes))[0]  # (n + m, p_l)
            with no_autocast(F):
                J, mode = F @ F.T, "exact" if engine == "exact" else "materialize"
        blocks.append(J)
        modes.append(mode)
        k += len(piece)
    n, m = int(n_r.sum()), int(m_r.sum())
    K, b, c = kbc_from_joint(torch.stack(blocks), n, m)
    info = {"modes": modes, "comm": forms, "n": n, "m": m, "shares": sizes[:, :2].tolist(),
            "losses": _union([g[0][:, 0] for g in gathered], sizes), "bytes": sent, "seconds": seconds}
    if engine == "sketch":
        info.update(sketch_dim=sketch_dim, seed=seed)
    return Gram(K, b, c, [layer.name for layer in cap.layers], engine, info)
