"""The report of `drpt bench step`: its header (machine, load, model, what was timed) and its tables.

Split from experiments/bench/step.py, which times; this module only formats. The floor table is
experiments/bench/floor.py's.

Shapes: no tensors here (rows of seconds per phase, as bench_cell returns them).
"""

from __future__ import annotations

import datetime
import os
import platform

import torch

from drpt_ref.batched.compiled import compiled_kernels, failed_kernels
from drpt_ref.experiments.bench.solvers import cpu_name
from drpt_ref.training.dr_step import PHASES

ENGINES = ("ghost", "ghost-mat", "exact", "sketch")  # ghost-mat: ghost with every layer materialized
COMPILED = " (compiled)"  # the label of a method run with solver="compiled" (dr_step's QP compiled whole)


def header_lines(args, device, config, shapes, shape_methods, load_start, rows) -> list[str]:
    """The markdown header: date, device, machine and load, the model, what each row times; for rows with the
    compiled solver, their warm-up (compile) seconds, and whether torch.compile failed (their label then says so)."""
    c = config
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    header = [
        "# drpt bench step", "",
        f"- date: {datetime.date.today().isoformat()}; device: {device}"
        + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else " (no GPU in this run)"),
        f"- machine: {cpu_name()}, {os.cpu_count()} CPU cores visible, torch {torch.__version__} with "
        f"{torch.get_num_threads()} thread(s), Python {platform.python_version()}; load average (1 / 5 / 15 min) "
        f"at the start {' / '.join(f'{x:.2f}' for x in load_start)}, at the end {' / '.join(f'{x:.2f}' for x in load)}",
        f"- model: random GPT-2 of the shape of {args.model} (n_layer {c.n_layer}, n_embd {c.n_embd}, n_head "
        f"{c.n_head}, vocab {c.vocab_size}, n_positions {c.n_positions}); synthetic SFT rows of T tokens, loss on "
        f"the second half; m = {args.m_target} target units; AdamW (fused, training/optimizer.py); batched solver; "
        "default knobs",
        f"- median of {args.repeat} runs after a warm-up, freed host memory kept mapped as in drpt train "
        "(training/host_memory.py); peak MB in one more untimed run = "
        + ("torch.cuda.max_memory_allocated over the step" if device.type == "cuda" else
           "peak resident set over the step (VmHWM after /proc/self/clear_refs, freed blocks unmapped in that run), "
           "a process-level measure"),
        "- standard = forward/backward of the mean general loss + optimizer (no capture, no target batch); the "
        "Dr phases are dr_step's: capture (fwd+bwd over n + m units), Gram, solve, update (assembly + optimizer)"
        + ("; on CUDA every phase boundary is synchronized (dr_step's phase_clock)" if device.type == "cuda" else ""),
    ]
    if shapes:
        header.append(f"- shapes: {', '.join(shapes)}, random weights from their published configs "
                      f"(experiments/bench/shapes.py), cut to {args.layers or 'all'} decoder blocks; methods "
                      f"{', '.join(shape_methods)} (ghost Gram)")
    compiled_rows = [r for r in rows if r["method"].endswith(COMPILED)]
    if compiled_rows:
        header.append("- rows 'METHOD (compiled)': dr_step with solver='compiled' (the sync-free QP one torch.compile "
                      "graph, batched/compiled.py); their warm-up step, with the compile, took "
                      + ", ".join(f"{r['warm_s']:.0f} s (n = {r['n']}, T = {r['T']}, m = {r['m']})"
                                  for r in compiled_rows))
        failed = failed_kernels(compiled_kernels(device))
        if failed:  # those kernels ran eager (batched/compiled.py): no compiled figure, and the rows say so
            header.append(f"- torch.compile failed for {', '.join(failed)} (the RuntimeWarning says why): those "
                          "kernels ran eager, so the rows marked 'compile failed' are eager times")
            for r in compiled_rows:
                r["method"] = r["method"].removesuffix(COMPILED) + " (compile failed: eager)"
    return header


def render(rows, cross, header) -> str:
    ms = lambda t: f"{1e3 * t:,.1f}"  # noqa: E731
    cols = ["n", "T", "m", "method", "gram", "fwd+bwd ms", "gram ms", "solve ms", "update ms", "total ms",
            "ratio to standard", "peak MB"]
    lines = header + ["", "## Time per step by phase", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join([str(r["n"]), str(r["T"]), str(r["m"]), r["method"], r["engine"]]
                                       + [ms(r[k]) for k in (*PHASES, "total")]
                                       + [f"{r['ratio']:.2f}x", f"{r['peak_mb']:.1f}"]) + " |")
    lines += ["", "## Dr step / standard step, per cell (range over methods)", "",
              "| n | T | m | " + " | ".join(ENGINES) + " |", "|---|---|---|" + "---|" * len(ENGINES)]
    for n, T, m in dict.fromkeys((r["n"], r["T"], r["m"]) for r in rows):
        cell = [r for r in rows if (r["n"], r["T"], r["m"]) == (n, T, m)]
        span = []
        for g in ENGINES:
            ratios = [r["ratio"] for r in cell if r["engine"] == g]
            span.append("-" if not ratios else f"{min(ratios):.2f}x" if len(ratios) == 1
                        else f"{min(ratios):.2f}x - {max(ratios):.2f}x")
        lines.append(f"| {n} | {T} | {m} | " + " | ".join(span) + " |")
    lines += ["", "## Ghost Gram: token pairs vs materialized per-unit gradients (same capture)", "",
              "| n | T | pair ms | materialize ms | pair / materialize | faster | cost rule picks pair in |",
              "|---|---|---|---|---|---|---|"]
    for c in cross:
        faster = "pair" if c["pair"] < c["materialize"] else "materialize"
        lines.append(f"| {c['n']} | {c['T']} | {ms(c['pair'])} | {ms(c['materialize'])} | "
                     f"{c['pair'] / c['materialize']:.2f} | {faster} | {c['rule_pair_layers']}/{c['layers']} layers |")
    return "\n".join(lines)


