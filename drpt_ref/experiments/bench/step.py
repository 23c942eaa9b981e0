"""`drpt bench step`: the cost of one Dr step against the standard step, by phase, over a grid of n and T.

For each cell (n general units, T tokens per unit; m target units) on synthetic token batches and a
randomly initialised GPT-2 of the shape of --model (n_positions raised to the longest T), it times

    standard   one forward/backward of the mean general loss over the n units, then the optimizer
               (the covered parameters only, as in every Dr method; written here, not in dr_step)
    Dr         dr_step for each method with the ghost Gram (its per-layer form by the cost rule, "auto"), and
               for --gram-methods also with: ghost-mat (the same step, every layer's ghost Gram forced to
               materialized per-unit gradients), the exact Gram (per-unit autograd) and the sketch Gram; for
               --compiled-methods also with solver="compiled" (the QP one torch.compile graph, batched/compiled.py)
               phases: capture (forward+backward over n + m units), Gram, solve, update (assembly + optimizer)

Runs are interleaved (each repeat runs every config once; the median per phase is kept), so that load
from other processes falls on all configs alike; each config's total is printed as a ratio to the
standard step. The timed runs keep freed host memory mapped, as drpt train does (training/host_memory.py); the peak
memory of the step over the memory before it is taken in one more, untimed run of each config (CPU: the process's
peak resident set, reset through /proc/self/clear_refs, with freed blocks unmapped during that run so that the
resident set follows the tensors; CUDA: torch.cuda.max_memory_allocated). A second
table times the two exact ghost forms on the same capture, the token-pair form against materialized
per-unit layer gradients (gram_from_capture with ghost_mode "pair" / "materialize"), as T grows: where
one overtakes the other, against the cost rule of eq. (5) in theory/gram.md. A third table prints every phase
over its floor (experiments/bench/floor.py, theory/step_cost.md), for the grid and the --shapes (realistic model
shapes built from configs): the machine's matmul rate and memory bandwidth are measured at the start and at the end
of the run and the better kept, since a shared machine's load would lower every floor.

Shapes: general input_ids (n, T), target input_ids (m, T); loss mask on the second half of each row.
"""

from __future__ import annotations

import copy
import functools
import os
import statistics
import time
from unittest import mock

import torch
from tqdm import tqdm
from transformers import AutoConfig, GPT2LMHeadModel

from drpt_ref.core.methods import METHODS
from drpt_ref.experiments.bench.floor import floor_table, machine_rates, model_counts, phase_floors
from drpt_ref.experiments.bench.run_flags import add_model_run_flags, check_model_run_flags
from drpt_ref.experiments.bench.shapes import SHAPES, build_shape
from drpt_ref.experiments.bench.solvers import QP_METHODS
from drpt_ref.experiments.bench.step_report import COMPILED, ENGINES, header_lines, render
from drpt_ref.flags import write_output
from drpt_ref.gram.compute import gram_from_capture
from drpt_ref.gram.ghost import capture, use_pair_form
from drpt_ref.losses.sft import SFTLoss
from drpt_ref.losses.unit_batch import RowBatch, token_logprobs
from drpt_ref.training import dr_step as dr_step_module
from drpt_ref.training.dr_step import PHASES, Knobs, dr_step, freeze_uncovered
from drpt_ref.training.host_memory import retain_freed_memory, unmap_freed_memory
from drpt_ref.training.optimizer import make_optimizer


def add_arguments(parser) -> None:
    parser.add_argument("--device", default="cpu", help="torch device (cpu, cuda)")
    parser.add_argument("--quick", action="store_true", help="a small grid (seconds)")
    parser.add_argument("--grid", default=None, help="comma-separated NxT or NxTxM cells (None: "
                        "8x32,16x32,32x32,8x128,32x128; with --quick 4x16,8x32)")
    parser.add_argument("--crossover", default=None, help="NxT1:T2:... cells of the pair/materialize table "
                                                          "(None: 16x16:32:64:128:256; with --quick 4x8:16:32)")
    parser.add_argument("--m-target", type=int, default=4, help="target units per step")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated Dr methods (ghost Gram)")
    parser.add_argument("--gram-methods", default="simplex",
                        help="methods also run with the ghost-mat (materialize forced), exact and sketch Gram")
    parser.add_argument("--compiled-methods", default="",
                        help="QP methods (simplex, capped_simplex, cone) also run with --solver compiled, the QP one "
                        "torch.compile graph (rows 'METHOD (compiled)'; each new n compiles first, minutes on a CPU, "
                        "warm-up seconds printed)")
    add_model_run_flags(parser, "runs per config")
    parser.add_argument("--shapes", default="", help="comma-separated realistic shapes built from configs, also "
                        "benchmarked: " + ", ".join(SHAPES) + " ('': none)")
    parser.add_argument("--shape-grid", default="8x512x1,16x512",
                        help="NxT or NxTxM cells (M target units, default --m-target) of the --shapes")
    parser.add_argument("--shape-methods", default="capped_simplex", help="Dr methods on the --shapes (ghost Gram)")
    parser.add_argument("--layers", type=int, default=2, help="decoder blocks of each --shapes model (0: all)")


# ---- setup -----------------------------------------------------------------------------------------------------

def make_model(folder: str, max_T: int, device, seed: int):
    """A random GPT-2 of the folder's shape with n_positions >= max_T, eval mode, uncovered params frozen."""
    if not os.path.isdir(folder):
        raise ValueError(f"--model={folder!r} is not a folder with a config.json")
    cfg = AutoConfig.from_pretrained(folder)
    cfg.n_positions = max(cfg.n_positions, max_T)
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(cfg).to(device).eval()  # timing does not depend on the weights' values
    freeze_uncovered(model)
    return model


def token_batch(units: int, T: int, vocab: int, gen: torch.Generator, device) -> RowBatch:
    """Random tokens; the loss is on the second half of each row (an SFT answer). -> RowBatch (units, T)"""
    ids = torch.randint(3, vocab, (units, T), generator=gen)  # (units, T), past the special tokens
    loss_mask = torch.zeros(units, T, dtype=torch.long)
    loss_mask[:, T // 2:] = 1
    return RowBatch(ids.to(device), torch.ones_like(ids).to(device), loss_mask.to(device), 1)


def parse_cells(text: str, name: str, m: int | None = None) -> list[tuple[int, ...]]:
    """NxT cells -> [(N, T)]; with m given, NxT or NxTxM cells -> [(N, T, M)] (M defaults to m)."""
    try:
        cells = [tuple(int(x) for x in cell.lower().split("x")) for cell in text.split(",") if cell.strip()]
    except ValueError:
        cells = []
    sizes = (2,) if m is None else (2, 3)
    if not cells or any(len(c) not in sizes or min(c[:2]) < 2 or min(c) < 1 for c in cells):
        raise ValueError(f"{name}={text!r} must be comma-separated NxT{'' if m is None else '[xM]'} cells with "
                         "N, T >= 2 (M >= 1), e.g. 8x32,32x128")
    return cells if m is None else [c if len(c) == 3 else (*c, m) for c in cells]


# ---- memory and timing -----------------------------------------------------------------------------------------

def _status_kb(key: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


class PeakMemory:
    """Peak memory over the start of the block, in MB (CPU: resident set; CUDA: allocated tensors)."""

    def __init__(self, device):
        self.device, self.mb = device, float("nan")

    def __enter__(self):
        if self.device.type != "cuda":  # the resident set follows the tensors only while freed blocks are unmapped:
            unmap_freed_memory()  # a measuring pass, never timed; __exit__ restores the timed runs' setting
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            try:
                with open("/proc/self/clear_refs", "w") as fh:
                    fh.write("5")  # reset the peak resident set (VmHWM) to the current one (Linux >= 4.0)
            except OSError:
                pass
            self.base = _status_kb("VmRSS") * 1024
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.mb = (torch.cuda.max_memory_allocated(self.device) - self.base) / 2**20
        else:
            self.mb = max(0, _status_kb("VmHWM") * 1024 - self.base) / 2**20
            retain_freed_memory()  # back to what drpt train runs with (training/host_memory.py)
        return False


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def standard_step(model, optimizer, unit_loss, general: RowBatch) -> dict:
    """The plain step: forward/backward of the mean general loss, then the optimizer. -> seconds by phase"""
    t0 = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    losses = unit_loss(token_logprobs(model, general.input_ids, general.attention_mask), general)  # (n,)
    losses.mean().backward()
    t1 = time.perf_counter()
    optimizer.step()
    return {"forward_backward": t1 - t0, "gram": 0.0, "solve": 0.0, "update": time.perf_counter() - t1}


def time_run(step_fn, device) -> dict:
    """Seconds per phase and total of one run of step_fn (host memory as drpt train keeps it)."""
    _sync(device)
    t0 = time.perf_counter()
    sec = step_fn()
    _sync(device)
    return sec | {"total": time.perf_counter() - t0}


def peak_run(step_fn, device) -> float:
    """Peak MB of one run of step_fn, in a pass of its own (on a CPU, measuring unmaps freed blocks: not timed)."""
    with PeakMemory(device) as mem:
        step_fn()
    return mem.mb


def _dr_seconds(model, optimizer, loss, general, target, method, knobs, engine, sketch_dim) -> dict:
    gram = "ghost" if engine == "ghost-mat" else engine
    if engine != "ghost-mat":
        solver = "compiled" if method.endswith(COMPILED) else "batched"
        return dr_step(model, optimizer, loss, general, target, method.removesuffix(COMPILED), knobs, gram=gram,
                       sketch_dim=sketch_dim, solver=solver)["seconds"]
    # ghost-mat: the same dr_step with the ghost Gram's per-layer form forced to materialized gradients
    forced = functools.partial(gram_from_capture, ghost_mode="materialize")
    with mock.patch.object(dr_step_module, "gram_from_capture", forced):
        return dr_step(model, optimizer, loss, general, target, method, knobs, gram=gram)["seconds"]


def bench_cell(model, n: int, T: int, args, device, configs, gen, m: int, shape: str) -> list[dict]:
    """Every config on one (n, T, m) cell, the standard step first; each row keeps the model's counts, from which
    `run` computes its floor once the run's rates are known (experiments/bench/floor.py).

    Runs are interleaved (repeat r runs every config once), so that load from other processes falls on all
    configs alike; each config keeps the median of its runs per phase and the largest peak memory.
    """
    vocab = model.config.vocab_size
    general, target = token_batch(n, T, vocab, gen, device), token_batch(m, T, vocab, gen, device)
    counts = model_counts(model)  # the FLOP and byte counts of its floor, theory/step_cost.md
    loss, knobs, fns = SFTLoss(), Knobs(), []
    for method, engine in [("standard", "-")] + configs:
        copied = copy.deepcopy(model)  # every config starts from the same weights and a fresh optimizer
        opt = make_optimizer("adamw", [p for p in copied.parameters() if p.requires_grad], lr=1e-4)  # as drpt train
        if method == "standard":
            fns.append(functools.partial(standard_step, copied, opt, loss, general))
        else:
            fns.append(functools.partial(_dr_seconds, copied, opt, loss, general, target, method, knobs, engine,
                                         args.sketch_dim))
    warm = []
    for fn in fns:  # warm-up (and the compile of a compiled solver's first call)
        t0 = time.perf_counter()
        fn()
        warm.append(time.perf_counter() - t0)
    runs = [[time_run(fn, device) for fn in fns] for _ in range(args.repeat)]  # (repeat, configs)
    peaks = [peak_run(fn, device) for fn in fns]  # after the timed runs, in a pass of its own
    rows = []
    for i, (method, engine) in enumerate([("standard", "-")] + configs):
        mine = [rep[i] for rep in runs]
        rows.append(dict(n=n, T=T, m=m, shape=shape, method=method, engine=engine,
                         **{k: statistics.median(r[k] for r in mine) for k in (*PHASES, "total")},
                         peak_mb=peaks[i], warm_s=warm[i],
                         counts=counts))
    base = rows[0]["total"]
    for r in rows:
        r["ratio"] = r["total"] / base
    return rows


def bench_crossover(model, n: int, T: int, args, device, gen) -> dict:
    """Pair vs materialized ghost Gram on one capture (median of --repeat); which form the cost rule picks."""
    vocab = model.config.vocab_size
    cap = capture(model, SFTLoss(), token_batch(n, T, vocab, gen, device),
                  token_batch(args.m_target, T, vocab, gen, device))
    out = dict(n=n, T=T)
    for mode in ("pair", "materialize"):
        times = []
        for _ in range(args.repeat + 1):
            _sync(device)
            t0 = time.perf_counter()
            gram_from_capture(cap, "ghost", ghost_mode=mode)
            _sync(device)
            times.append(time.perf_counter() - t0)
        out[mode] = statistics.median(times[1:])
    U, T_u = cap.n + cap.m, cap.per_unit(cap.a[0]).shape[1]  # units, tokens per unit
    out["rule_pair_layers"] = sum(use_pair_form(T_u, ly.d_in, ly.d_out, U) for ly in cap.layers)
    out["layers"] = len(cap.layers)
    return out


def run(args) -> int:
    device = torch.device(args.device)  # checked by bench/command.py (run)
    check_model_run_flags(args)  # --repeat, --threads, --sketch-dim
    if args.m_target < 1:
        raise ValueError(f"--m-target={args.m_target} must be >= 1")
    torch.set_num_threads(args.threads)
    retain_freed_memory()  # as drpt train (cli.py): freed host blocks stay mapped between steps
    load_start = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    grid = parse_cells(args.grid or ("4x16,8x32" if args.quick else "8x32,16x32,32x32,8x128,32x128"), "--grid",
                       args.m_target)
    shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    bad = sorted(set(shapes) - set(SHAPES))
    if bad:
        raise ValueError(f"--shapes: unknown {bad}; choose from {sorted(SHAPES)}")
    shape_grid = parse_cells(args.shape_grid, "--shape-grid", args.m_target)
    shape_methods = [m.strip() for m in args.shape_methods.split(",") if m.strip()]
    cross_spec = args.crossover or ("4x8:16:32" if args.quick else "16x16:32:64:128:256")
    cross_cells = [(n, int(T)) for cell in cross_spec.split(",") for n, Ts in [cell.lower().split("x", 1)]
                   for T in Ts.split(":")]
    cross_cells = parse_cells(",".join(f"{int(n)}x{T}" for n, T in cross_cells), "--crossover")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    gram_methods = [m.strip() for m in args.gram_methods.split(",") if m.strip()]
    compiled_methods = [m.strip() for m in args.compiled_methods.split(",") if m.strip()]
    unknown = sorted(set(methods + gram_methods + shape_methods) - set(METHODS))
    if unknown:
        raise ValueError(f"--methods/--gram-methods/--shape-methods: unknown {unknown}; choose from {sorted(METHODS)}")
    if not set(compiled_methods) <= set(QP_METHODS):  # only these have a QP for the compiled solver to compile
        raise ValueError(f"--compiled-methods: {sorted(set(compiled_methods) - set(QP_METHODS))} is not a method with "
                         f"a QP to compile; choose from {list(QP_METHODS)}")
    configs = [(m, "ghost") for m in methods] + [(m + COMPILED, "ghost") for m in compiled_methods] + [
        (m, g) for g in ENGINES[1:] for m in gram_methods]
    first = machine_rates(device)  # the floor's FLOP/s and bytes/s, measured now (experiments/bench/floor.py)
    model = make_model(args.model, max(c[1] for c in grid + cross_cells), device, args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    rows = []
    for n, T, m in tqdm(grid, desc="bench step"):
        rows += bench_cell(model, n, T, args, device, configs, gen, m, os.path.basename(args.model.rstrip("/")))
    shape_rows = []
    for shape in shapes:  # realistic shapes, cut to --layers blocks
        big = build_shape(shape, args.layers, max(T for _, T, _ in shape_grid), device, args.seed)
        for n, T, m in tqdm(shape_grid, desc=shape):
            shape_rows += bench_cell(big, n, T, args, device, [(x, "ghost") for x in shape_methods], gen, m, shape)
        del big
    cross = [bench_crossover(model, n, T, args, device, gen) for n, T in tqdm(cross_cells, desc="pair vs materialize")]
    # the machine is shared: a rate measured while another job ran would lower every floor, so the floors use the
    # better of the rates measured at the start and now, at the end
    later = machine_rates(device)
    rates = {k: max(v, later[k]) for k, v in first.items()}
    for r in rows + shape_rows:  # seconds at the floor of each row's step
        r["floor"] = phase_floors(r["counts"], r["n"], r["m"], r["T"], rates)["standard" if r["method"] == "standard"
                                                                                else "dr"]
    header = header_lines(args, device, model.config, shapes, shape_methods, load_start, rows)
    table = render(rows, cross, header)
    table += "\n\n## Measured over the FLOP floor, per phase (theory/step_cost.md)\n\n" + "\n".join(
        floor_table([r for r in rows + shape_rows if r["engine"] in ("-", "ghost")], rates))
    print(table)
    if args.out:
        write_output(args.out, table)
    return 0
