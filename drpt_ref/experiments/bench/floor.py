"""The FLOP floor of each phase of the standard step and the Dr step, and this machine's rates to turn it into time.

The floor of a phase is the least arithmetic it needs (theory/step_cost.md, eqs. (1)-(4)) at the rate this machine
reaches on one large matrix product (`machine_rates`, measured at the start and at the end of the run, the better
kept), plus, for the optimizer, its memory traffic at the measured bandwidth; the update from kept per-unit gradients
is a roofline (the larger of its FLOPs and its reads of F, eq. (3')). `drpt bench step` prints measured time / floor
per phase.

With N tokens in the step, U = n + m units of T_u tokens, p_l = d_in d_out (+ d_out) the parameters of covered layer l,
P = sum_l d_in d_out (matrix products only), P_in = the part of P whose layer input needs a gradient (not the
first block's projections of the frozen embeddings), H = d_model V the output head when not covered, A = 2 T D L_b
the causal attention FLOPs per token (D = heads x head dim, L_b blocks):

    forward                      2 N (P + H) + N A                                         eq. (1)
    backward, standard           2 N (P_in + H) + 2 N A + 2 N P   (input and weight gradients)
    backward with capture        2 N (P_in + H) + 2 N A           (no weight gradient)      eq. (2)
    Gram                         sum_l min(2 N p_l + 2 (n^2 + n + 1) p_l,  2 U^2 T_u^2 (d_in + d_out))  eq. (5)
    update                       max(2 (n + 1) P_F FLOPs, (n + 1) P_F float32 reads), P_F the parameters of the
                                 layers whose F was kept (bias rows included), from the kept per-unit
                                 gradients (a vector-matrix product is memory-bound: eq. (3')) + AdamW's traffic
    solve                        O(iterations n^2): no floor worth the name; reported in ms (launch bound)

Shapes: none (counts from the model's covered layers and config).
"""

from __future__ import annotations

import time

import torch

from drpt_ref.gram.ghost import KEEP_FLAT_RATIO, use_pair_form
from drpt_ref.gram.layers import covered_layers

ADAMW_BYTES_PER_PARAM = 7 * 4  # float32: read p, g, m, v; write p, m, v
F_BYTES = 4  # one element of the kept per-unit gradients F: float32 (the benchmark's models are float32)


def machine_rates(device, repeat: int = 5) -> dict:
    """FLOP/s of one float32 (1024 x 1024) @ (1024 x 1024) product, and bytes/s of memory: the faster of a 64 MB
    copy (2 streams counted; a CPU's write-allocate reads the destination too, so a copy understates it) and an
    in-place 64 MB triad x += 0.5 y (3 streams: read x, y, write x, as AdamW's in-place updates move memory).
    Best of `repeat`."""
    x = torch.randn(1024, 1024, device=device)
    y = torch.randn(1024, 1024, device=device)
    src = torch.zeros(16 * 2**20, device=device)
    dst = torch.zeros_like(src)

    def best(fn):
        times = []
        for _ in range(repeat + 1):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - t0)
        return min(times[1:])

    copy = 2 * src.numel() * 4 / best(lambda: dst.copy_(src))
    triad = 3 * src.numel() * 4 / best(lambda: dst.add_(src, alpha=0.5))
    return {"flops": 2 * 1024**3 / best(lambda: x @ y), "bytes": max(copy, triad)}


def _input_needs_grad(model, layers) -> list[bool]:
    """Whether each covered layer's input depends on a trained parameter (else no input gradient is formed there:
    the first block's projections of the frozen embeddings), from one 2-token forward with hooks."""
    seen, handles = {}, []

    def hook(name):
        def record(module, inputs, output):  # returns None: the output is left alone
            seen.setdefault(name, inputs[0].requires_grad)
        return record

    for ly in layers:
        handles.append(ly.module.register_forward_hook(hook(ly.name)))
    try:
        device = next(model.parameters()).device
        ids = torch.zeros(1, 2, dtype=torch.long, device=device)
        model(input_ids=ids, attention_mask=torch.ones_like(ids))
    finally:
        for h in handles:
            h.remove()
    return [seen.get(ly.name, True) for ly in layers]


def model_counts(model) -> dict:
    """Pm (covered weights), P_in (those whose input needs a gradient), H (output head), the attention FLOPs per
    token and context token (2 D L_b), and the covered layers (d_in, d_out, bias)."""
    cfg = model.config
    d_model = getattr(cfg, "hidden_size", None) or cfg.n_embd
    heads = getattr(cfg, "num_attention_heads", None) or cfg.n_head
    head_dim = getattr(cfg, "head_dim", None) or d_model // heads
    blocks = getattr(cfg, "num_hidden_layers", None) or cfg.n_layer
    covered = covered_layers(model)
    layers = [(ly.d_in, ly.d_out, ly.has_bias) for ly in covered]
    head_covered = any(o == cfg.vocab_size for _, o, _ in layers)  # an untied head is a covered layer, in P
    needs = _input_needs_grad(model, covered)
    return {"P": sum(i * o for i, o, _ in layers), "P_in": sum(i * o for (i, o, _), g in zip(layers, needs) if g),
            "H": 0 if head_covered else d_model * cfg.vocab_size,
            "attn": 2 * heads * head_dim * blocks, "layers": layers}


def phase_floors(counts: dict, n: int, m: int, T: int, rates: dict) -> dict:
    """Seconds at the floor, per phase, for the standard step (n units) and the Dr step (n + m units of T tokens)."""
    P, P_in, H, attn = counts["P"], counts["P_in"], counts["H"], counts["attn"]
    flops, bw = rates["flops"], rates["bytes"]

    def fwd_bwd(N, weight_grads: bool):  # matrix products only (bias additions are N d_out, left out)
        A = attn * T / 2 * N  # causal: T / 2 context tokens on average, eq. (1)
        return (2 * N * (P + H) + A + 2 * N * (P_in + H) + 2 * A + (2 * N * P if weight_grads else 0)) / flops

    U, N = n + m, (n + m) * T
    gram, update, update_read = 0.0, 0.0, 0.0
    for d_in, d_out, bias in counts["layers"]:
        p_l = (d_in + bias) * d_out  # the bias gradient is one more row of the per-unit product (gram/ghost.py)
        if use_pair_form(T, d_in, d_out, U):
            gram += 2 * U * U * T * T * (d_in + d_out) + (2 * U * U * d_out if bias else 0)
            update += 2 * N * d_in * d_out
        else:  # the m target units summed into one row: n + 1 rows of F (eq. (5) in theory/step_cost.md)
            gram += 2 * N * p_l + 2 * (n * n + n + 1) * p_l  # F, then K = F_n F_n^T, F_n f_T, f_T . f_T
            kept = (n + 1) * p_l <= KEEP_FLAT_RATIO * N * (d_in + d_out)  # eq. (3): from F if kept, else a and e
            update += 2 * (n + 1) * p_l if kept else 2 * N * d_in * d_out
            update_read += F_BYTES * (n + 1) * p_l if kept else 0.0  # eq. (3'): F read once
    adamw = ADAMW_BYTES_PER_PARAM * (P + sum(d_out for _, d_out, bias in counts["layers"] if bias)) / bw
    update = max(update / flops, update_read / bw) + adamw  # a roofline: the products' FLOPs or F's reads
    return {"standard": {"forward_backward": fwd_bwd(n * T, True), "gram": 0.0, "solve": 0.0, "update": adamw},
            "dr": {"forward_backward": fwd_bwd(N, False), "gram": gram / flops, "solve": 0.0, "update": update}}


def floor_table(rows: list[dict], rates: dict) -> list[str]:
    """Markdown lines: every phase in ms and as measured / floor (solve: ms only), and the Dr step / standard step of
    the same cell and run. rows: bench_cell's with the ghost Gram (the floor is its), each with `floor` (seconds)."""
    def cell(r, k):
        f = r["floor"][k]
        return f"{1e3 * r[k]:,.1f} ({r[k] / f:.2f}x)" if f > 0 else "-" if r[k] == 0 else f"{1e3 * r[k]:,.1f}"

    lines = [f"Floor rates measured in this run (the better of its start and its end): {rates['flops'] / 1e9:.1f} "
             "GFLOP/s (one float32 1024^3 matmul), "
             f"{rates['bytes'] / 1e9:.1f} GB/s (the faster of a 64 MB copy and a 64 MB in-place triad). "
             "Cells: ms (measured / floor).", "",
             "| shape | n | T | m | method | fwd+bwd | gram | solve ms | update | total | Dr / standard |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        floor_total = sum(r["floor"].values())
        lines.append(f"| {r['shape']} | {r['n']} | {r['T']} | {r['m']} | {r['method']} | "
                     + " | ".join(cell(r, k) for k in ("forward_backward", "gram", "solve", "update"))
                     + f" | {1e3 * r['total']:,.1f} ({r['total'] / floor_total:.2f}x) | {r['ratio']:.2f}x |")
    below = sum(r[k] < r["floor"][k] for r in rows for k in r["floor"] if r["floor"][k] > 0)
    if below:  # a floor was beaten: the rates understate what the phases reached, or the model is no bound there
        lines += ["", f"{below} phase(s) above ran below their floor: the rates measured in this run understate what "
                  "those phases reached (measured while the shared machine ran slow, or the floor's model is no "
                  "bound for that phase), so measured / floor reads low there; the Dr / standard ratios are "
                  "unaffected."]
    return lines
